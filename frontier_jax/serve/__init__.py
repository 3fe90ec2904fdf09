"""Serving: an OpenAI-compatible HTTP server over the inference engine (`frontier-jax serve`)."""

from frontier_jax.serve.config import ServeConfig

__all__ = ["ServeConfig"]
