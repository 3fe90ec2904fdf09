"""Inference: prefill and decode over the paged absorbed-MLA latent cache."""
