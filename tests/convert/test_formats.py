"""Checkpoint storage variants import to the same parameters: sharded with an index, fused
expert tensors, bfloat16 values."""

import os

import torch

from frontier_jax.convert import from_hf
from frontier_jax.convert.safetensors_io import INDEX_FILE

from .helpers import TINY, assert_same_params, read_config, read_tensors, tiny_hf_model, write_checkpoint


def test_sharded_checkpoint_imports_like_the_single_file(saved_tiny, tmp_path):
    path, _ = saved_tiny
    tiny_hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / INDEX_FILE)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 3
    assert_same_params(from_hf(str(tmp_path))[1], from_hf(path)[1])


def test_fused_expert_tensors_import_like_per_expert_ones(saved_tiny, tmp_path):
    """transformers' in-memory layout: experts.gate_up_proj [E, 2f, d] (gate rows first) and
    experts.down_proj [E, d, f]."""
    path, _ = saved_tiny
    tensors = read_tensors(path)
    for i in range(TINY["first_k_dense_replace"], TINY["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        pop = lambda name: torch.stack(
            [tensors.pop(f"{p}{e}.{name}_proj.weight") for e in range(TINY["n_routed_experts"])]
        )
        gate, up, down = pop("gate"), pop("up"), pop("down")
        tensors[f"{p}gate_up_proj"], tensors[f"{p}down_proj"] = torch.cat([gate, up], dim=1), down
    fused = write_checkpoint(str(tmp_path), tensors, read_config(path))
    assert_same_params(from_hf(fused)[1], from_hf(path)[1])


def test_bfloat16_checkpoint_imports_the_bfloat16_values(saved_tiny, tmp_path):
    path, _ = saved_tiny
    tensors = read_tensors(path)
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    rounded = {k: v.float() for k, v in bf16.items()}
    bf16_dir = write_checkpoint(str(tmp_path / "bf16"), bf16, read_config(path))
    rounded_dir = write_checkpoint(str(tmp_path / "f32"), rounded, read_config(path))
    assert_same_params(from_hf(bf16_dir)[1], from_hf(rounded_dir)[1])
