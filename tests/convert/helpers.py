"""Helpers of the conversion tests: tiny random transformers DeepseekV3/V2 models (CPU, float32),
their logits and ours, and reading/writing checkpoint files directly."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from safetensors.torch import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

# 3 layers: one dense, two MoE; 8 experts in 4 groups; every head/rank size distinct so that a
# transposed or mis-split weight cannot go unnoticed.
TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=24,
    kv_lora_rank=16,
    qk_nope_head_dim=10,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    initializer_range=0.2,
    max_position_embeddings=256,
)
YARN = dict(
    rope_type="yarn",
    rope_theta=10000.0,
    factor=4.0,
    original_max_position_embeddings=64,
    mscale=1.0,
    mscale_all_dim=1.0,
)
LOGIT_RTOL = 1e-4


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """RMSNorm weights 1 + N(0, 0.1^2) (so a swapped norm is caught) and routing biases
    U(0, 0.5) (so the selection bias matters)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.5 * torch.rand_like(buffer))


def tiny_hf_model(seed: int = 0, **overrides) -> torch.nn.Module:
    """A random DeepseekV3ForCausalLM (or V2 with model_type="deepseek_v2") in eval mode."""
    torch.manual_seed(seed)
    fields = {**TINY, **overrides}
    if fields.pop("model_type", "deepseek_v3") == "deepseek_v2":
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**fields))
    else:
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**fields))
    _randomize_norms_and_biases(model)
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids: np.ndarray) -> np.ndarray:
    """Our next-token logits, jitted (one compile is faster than eager op-by-op dispatch)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return np.asarray(forward(state, jnp.asarray(ids, jnp.int32)))


def rel_err(value: np.ndarray, ref: np.ndarray) -> float:
    """max |value - ref| / max |ref|."""
    return float(np.abs(value - ref).max() / np.abs(ref).max())


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(path, "model.safetensors"))


def write_checkpoint(path: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    """A single-file checkpoint directory with `config` as config.json."""
    os.makedirs(path, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        os.path.join(path, "model.safetensors"),
        metadata={"format": "pt"},
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return path


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def flat_params(model) -> dict[tuple, np.ndarray]:
    """Every variable of our model by path, as numpy."""
    return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def assert_same_params(a, b) -> None:
    pa, pb = flat_params(a), flat_params(b)
    assert pa.keys() == pb.keys()
    for path in pa:
        np.testing.assert_array_equal(pa[path], pb[path], err_msg=".".join(path))


def write_mtp_checkpoint(
    path: str, depth: int = 1, **overrides
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A checkpoint of a 2-layer main model plus `depth` MTP modules (HF layers 2 .. 1 + depth),
    built from a random (2 + depth)-layer model whose last decoder layers serve as the MTP blocks
    (`overrides`: DeepseekV3Config fields).  Returns (the (2 + depth)-layer HF model, the
    MTP-only tensors added: enorm, hnorm, eh_proj, shared_head.norm / .head and embed_tokens per
    depth, the last two being copies of lm_head / embed_tokens)."""
    source = tiny_hf_model(num_hidden_layers=2 + depth, **overrides)
    source.save_pretrained(path)
    d = TINY["hidden_size"]
    gen = torch.Generator().manual_seed(1)
    tensors = read_tensors(path)
    extras = {}
    for k in range(depth):
        p = f"model.layers.{2 + k}."
        extras.update(
            {
                f"{p}enorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}hnorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}eh_proj.weight": 0.2 * torch.randn(d, 2 * d, generator=gen),
                f"{p}shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
                f"{p}shared_head.head.weight": tensors["lm_head.weight"].clone(),
                f"{p}embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
            }
        )
    config = {**read_config(path), "num_hidden_layers": 2, "num_nextn_predict_layers": depth}
    write_checkpoint(path, {**tensors, **extras}, config)
    return source, extras
