"""Checkpoints that do not fit the model fail with errors naming the tensors at fault."""

import os

import pytest
import torch

from frontier_jax.convert import from_hf

from .helpers import read_config, read_tensors, write_checkpoint


def _edited(saved_tiny, tmp_path, edit):
    path, _ = saved_tiny
    tensors = read_tensors(path)
    edit(tensors)
    return write_checkpoint(os.fspath(tmp_path), tensors, read_config(path))


def test_shape_mismatch_names_the_tensor_and_both_shapes(saved_tiny, tmp_path):
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # [H (dn + dv), kv_lora] = [44, 16]
    path = _edited(saved_tiny, tmp_path, lambda t: t.update({name: torch.zeros(44, 17)}))
    with pytest.raises(ValueError, match=rf"{name}: expected shape \(44, 16\), found \(44, 17\)"):
        from_hf(path)


def test_missing_tensors_are_listed(saved_tiny, tmp_path):
    gone = ["model.layers.2.self_attn.o_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight"]
    path = _edited(saved_tiny, tmp_path, lambda t: [t.pop(name) for name in gone])
    with pytest.raises(ValueError, match="lacks 2 tensor") as err:
        from_hf(path)
    assert all(name in str(err.value) for name in gone)


def test_unused_tensors_are_an_error_but_rotary_inv_freq_is_ignored(saved_tiny, tmp_path):
    extra = "model.layers.0.self_attn.extra_proj.weight"
    added = {extra: torch.zeros(2), "model.rotary_emb.inv_freq": torch.ones(4)}
    path = _edited(saved_tiny, tmp_path, lambda t: t.update(added))
    with pytest.raises(ValueError, match=rf"1 checkpoint tensor\(s\) are not used by the model: {extra}$"):
        from_hf(path)


def test_unsupported_config_key_is_named(saved_tiny, tmp_path):
    path, _ = saved_tiny
    config = {**read_config(path), "sliding_window": 128}
    with pytest.raises(ValueError, match="sliding_window"):
        from_hf(write_checkpoint(os.fspath(tmp_path), read_tensors(path), config))
