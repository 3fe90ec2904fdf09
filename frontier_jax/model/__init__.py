"""The model: one definition of the DeepSeek-V3 architecture used by every part of the stack,
built by `build_model` (LM or scalar head)."""

from frontier_jax.model.config import Head, ModelConfig, RopeScalingConfig
from frontier_jax.model.factory import build_model
from frontier_jax.model.transformer import HiddenOutput, ModelOutput, Transformer

__all__ = [
    "Head",
    "HiddenOutput",
    "ModelConfig",
    "RopeScalingConfig",
    "ModelOutput",
    "Transformer",
    "build_model",
]
