"""Basic layers against the float64 reference: RMSNorm, Linear contraction, embedding / tied
head, LM head and SwiGLU; dtype behaviour under the bf16 policy."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.layers import Embed, Linear, LMHead, RMSNorm, normal_param
from frontier_jax.model.mlp import SwiGLU

from . import common
from . import reference as ref

_call = common.jit(lambda m, x: m(x))
_attend = common.jit(lambda m, h: m.attend(h))


def test_rmsnorm_matches_reference():
    # fp32 vs float64: rtol 1e-5, atol 1e-6
    norm = common.build(lambda: RMSNorm(24, eps=1e-6), seed=1)
    x = np.random.default_rng(0).standard_normal((3, 5, 24)) * 3.0
    got = _call(norm, jnp.asarray(x, jnp.float32))
    common.assert_close(got, ref.rms_norm(x, common.params_f64(norm)["scale"], 1e-6), 1e-5, 1e-6)


def test_rmsnorm_eps_matters_for_small_inputs_and_keeps_dtype():
    norm = RMSNorm(8, eps=1e-2)
    x = np.full((1, 8), 0.05)
    # mean(x^2) = 0.0025, so y = 0.05 / sqrt(0.0125) = 0.4472136 (not 1)
    common.assert_close(_call(norm, jnp.asarray(x, jnp.float32)), np.full((1, 8), 0.05 / np.sqrt(0.0125)),
                        1e-6, 0)
    assert _call(norm, jnp.ones((2, 8), jnp.bfloat16)).dtype == jnp.bfloat16


def test_linear_contracts_trailing_input_dims():
    # in_shape (heads, v_head) -> out (d): y[..., o] = sum_{h, v} x[..., h, v] W[h, v, o]; rtol 1e-5
    lin = common.build(lambda: Linear((3, 4), (5,), ("heads", "v_head", "embed"), name="t", std=1.0,
                                      policy=common.FP32, rngs=nnx.Rngs(0)), seed=2)
    x = np.random.default_rng(1).standard_normal((2, 6, 3, 4))
    w = common.params_f64(lin)["kernel"]
    common.assert_close(_call(lin, jnp.asarray(x, jnp.float32)), np.einsum("bthv,hvo->bto", x, w), 1e-5, 1e-6)
    assert lin.kernel.get_metadata()["logical_axes"] == ("heads", "v_head", "embed")


def test_normal_param_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="rank"):
        normal_param(nnx.Rngs(0), (2, 3), ("embed",), 1.0)


def test_embed_lookup_tied_attend_and_lm_head():
    emb = common.build(lambda: Embed(10, 6, std=1.0, policy=common.FP32, rngs=nnx.Rngs(0)), seed=3)
    headm = common.build(lambda: LMHead(6, 10, std=1.0, policy=common.FP32, rngs=nnx.Rngs(0)), seed=4)
    e = common.params_f64(emb)["embedding"]
    w = common.params_f64(headm)["kernel"]
    ids = np.array([[3, 0, 9], [9, 9, 1]])
    common.assert_close(_call(emb, jnp.asarray(ids)), e[ids], 0, 0)
    h = np.random.default_rng(2).standard_normal((2, 3, 6))
    common.assert_close(_attend(emb, jnp.asarray(h, jnp.float32)), h @ e.T, 1e-5, 1e-6)
    common.assert_close(_call(headm, jnp.asarray(h, jnp.float32)), h @ w, 1e-5, 1e-6)


def test_bf16_policy_computes_in_bf16_and_heads_return_fp32():
    emb = common.build(lambda: Embed(10, 6, std=1.0, policy=common.BF16, rngs=nnx.Rngs(0)), seed=3)
    headm = common.build(lambda: LMHead(6, 10, std=1.0, policy=common.BF16, rngs=nnx.Rngs(0)), seed=4)
    assert emb.embedding[...].dtype == jnp.float32  # master weights stay fp32
    h = _call(emb, jnp.asarray([[1, 2]]))
    assert h.dtype == jnp.bfloat16
    assert _attend(emb, h).dtype == jnp.float32 and _call(headm, h).dtype == jnp.float32
    lin = common.build(lambda: Linear((6,), (4,), ("embed", "mlp"), name="t", std=1.0,
                                      policy=common.BF16, rngs=nnx.Rngs(0)), seed=5)
    assert _call(lin, jnp.ones((1, 6), jnp.float32)).dtype == jnp.bfloat16


def test_swiglu_matches_reference():
    # fp32 vs float64: rtol 1e-5, atol 1e-6
    mlp = common.build(lambda: SwiGLU(16, 24, std=1.0, policy=common.FP32, rngs=nnx.Rngs(0)), seed=6)
    p = common.params_f64(mlp)
    x = np.random.default_rng(3).standard_normal((4, 16))
    want = ref.swiglu(x, p["w_gate"]["kernel"], p["w_up"]["kernel"], p["w_down"]["kernel"])
    common.assert_close(_call(mlp, jnp.asarray(x, jnp.float32)), want, 1e-5, 1e-6)
