"""Block-scaled fp8 (e4m3 + weight_scale_inv) checkpoints import as their dequantised weights."""

import os

import pytest
import torch
from transformers import DeepseekV3ForCausalLM

from frontier_jax.convert import from_hf
from frontier_jax.convert.fp8 import fp8_block_size

from .helpers import (
    LOGIT_RTOL,
    assert_same_params,
    hf_logits,
    our_logits,
    read_config,
    read_tensors,
    rel_err,
    write_checkpoint,
)

E4M3_MAX = 448.0


def _quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (fp8 e4m3 values, scale_inv [ceil(out/b0), ceil(in/b1)]) with one scale
    per block: scale = amax(|block|) / 448."""
    (rows, cols), (b0, b1) = w.shape, block
    padded = torch.nn.functional.pad(w, (0, -cols % b1, 0, -rows % b0))
    blocks = padded.reshape(padded.shape[0] // b0, b0, padded.shape[1] // b1, b1)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / E4M3_MAX
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(padded.shape)
    return q[:rows, :cols].contiguous(), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return q.float() * full


@pytest.mark.parametrize("block", [(128, 128), (16, 16)])
def test_fp8_block_scaled_import_equals_the_dequantized_weights(block, saved_tiny, tmp_path, ids):
    path, _ = saved_tiny
    config = read_config(path)
    quantized, dequantized = {}, {}
    for name, w in read_tensors(path).items():
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):  # linears, as released
            q, scale = _quantize(w, block)
            quantized[name], quantized[f"{name}_scale_inv"] = q, scale
            dequantized[name] = _dequantize(q, scale, block)
            assert not torch.equal(dequantized[name], w)  # the rounding is real
        else:
            quantized[name] = dequantized[name] = w
    quant = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
    }
    fp8_dir = write_checkpoint(str(tmp_path / "fp8"), quantized, {**config, "quantization_config": quant})
    ref_dir = write_checkpoint(str(tmp_path / "ref"), dequantized, config)
    _, fp8_model = from_hf(fp8_dir)
    _, ref_model = from_hf(ref_dir)
    assert_same_params(fp8_model, ref_model)
    hf_ref = DeepseekV3ForCausalLM.from_pretrained(ref_dir).eval()
    err = rel_err(our_logits(fp8_model, ids), hf_logits(hf_ref, ids))
    print(f"fp8 {block}: max relative logit error {err:.2e}")
    assert err < LOGIT_RTOL


def test_fp8_scale_of_the_wrong_shape_is_rejected_naming_it(saved_tiny, tmp_path):
    path, _ = saved_tiny
    tensors = read_tensors(path)
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name], _ = _quantize(tensors[name], (16, 16))
    tensors[f"{name}_scale_inv"] = torch.ones(1, 1)
    quant = {"quant_method": "fp8", "weight_block_size": [16, 16]}
    config = {**read_config(path), "quantization_config": quant}
    with pytest.raises(ValueError, match=rf"{name}_scale_inv.*\(2, 2\).*\(1, 1\)"):
        from_hf(write_checkpoint(os.fspath(tmp_path), tensors, config))


def test_other_quantization_methods_are_rejected():
    with pytest.raises(ValueError, match="quantization_config.*'awq'"):
        fp8_block_size({"quantization_config": {"quant_method": "awq"}})
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8"}}) == (128, 128)
    assert fp8_block_size({}) is None
