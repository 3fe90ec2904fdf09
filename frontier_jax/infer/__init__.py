"""Inference: prefill and decode over the paged absorbed-MLA latent cache, continuous batching."""

from frontier_jax.infer.config import InferConfig
from frontier_jax.infer.engine import Engine
from frontier_jax.infer.sampling import SamplingParams
from frontier_jax.infer.scheduler import Completion, PrefixCacheStats, TokenEvent

__all__ = ["Completion", "Engine", "InferConfig", "PrefixCacheStats", "SamplingParams", "TokenEvent"]
