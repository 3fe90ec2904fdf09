"""Hugging Face interop: DeepseekV3/V2 safetensors checkpoints in (`from_hf`) and out (`to_hf`)."""

from frontier_jax.convert.exporter import to_hf
from frontier_jax.convert.hf_config import hf_config_to_model_config, model_config_to_hf_config
from frontier_jax.convert.importer import from_hf

__all__ = ["from_hf", "to_hf", "hf_config_to_model_config", "model_config_to_hf_config"]
