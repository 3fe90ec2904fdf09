"""The transformers peer of a benchmark: DeepseekV3ForCausalLM with our model config's shape."""

from __future__ import annotations


def hf_peer_model(model_cfg, dtype):
    """(DeepseekV3ForCausalLM with random weights, sdpa attention, on the GPU when there is one,
    in torch `dtype`; the device string)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from frontier_jax.convert import model_config_to_hf_config

    hf_cfg = DeepseekV3Config(**model_config_to_hf_config(model_cfg))
    hf_cfg._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return DeepseekV3ForCausalLM(hf_cfg).to(device=device, dtype=dtype), device
