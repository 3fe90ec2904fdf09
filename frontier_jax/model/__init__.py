"""The model: one definition of the DeepSeek-V3 architecture used by every part of the stack."""

from frontier_jax.model.config import ModelConfig, RopeScalingConfig
from frontier_jax.model.transformer import ModelOutput, Transformer

__all__ = ["ModelConfig", "RopeScalingConfig", "ModelOutput", "Transformer"]
