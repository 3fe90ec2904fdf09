"""frontier_jax: a JAX-native DeepSeek-V3-style frontier LLM stack."""

__version__ = "0.1.0"
