"""Basic layers against the float64 reference: RMSNorm, Linear contraction, joint projections,
embedding / tied head, LM head and SwiGLU; dtype behaviour under the bf16 policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.layers import (
    Embed,
    Linear,
    LMHead,
    RMSNorm,
    joining_pays,
    normal_param,
    project_jointly,
)
from frontier_jax.model.mlp import SwiGLU
from frontier_jax.precision import PrecisionPolicy
from frontier_jax.precision.recipe import FP8_DEEPSEEK

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
    common.assert_close(
        _call(norm, jnp.asarray(x, jnp.float32)), np.full((1, 8), 0.05 / np.sqrt(0.0125)), 1e-6, 0
    )
    assert _call(norm, jnp.ones((2, 8), jnp.bfloat16)).dtype == jnp.bfloat16


def test_linear_contracts_trailing_input_dims():
    # in_shape (heads, v_head) -> out (d): y[..., o] = sum_{h, v} x[..., h, v] W[h, v, o]; rtol 1e-5
    lin = common.build(
        lambda: Linear(
            (3, 4),
            (5,),
            ("heads", "v_head", "embed"),
            name="t",
            std=1.0,
            policy=common.FP32,
            rngs=nnx.Rngs(0),
        ),
        seed=2,
    )
    x = np.random.default_rng(1).standard_normal((2, 6, 3, 4))
    w = common.params_f64(lin)["kernel"]
    common.assert_close(_call(lin, jnp.asarray(x, jnp.float32)), np.einsum("bthv,hvo->bto", x, w), 1e-5, 1e-6)
    assert lin.kernel.get_metadata()["logical_axes"] == ("heads", "v_head", "embed")


def _linears(in_shape, out_shapes, policy, names=("a", "b", "c")):
    return [
        common.build(
            lambda: Linear(
                in_shape,
                out,
                ("embed",) * (len(in_shape) + len(out)),
                name=name,
                std=1.0,
                policy=policy,
                rngs=nnx.Rngs(0),
            ),
            seed=10 + i,
        )
        for i, (out, name) in enumerate(zip(out_shapes, names))
    ]


@pytest.mark.parametrize(
    "out_shapes",
    [
        [(5,), (3,), (7,)],  # concatenated along the last dim
        [(2, 4), (2, 4)],
    ],
)  # equal: stacked
def test_joint_projection_equals_each_layer(out_shapes):
    # fp32 vs float64: rtol 1e-5, atol 1e-6
    # 3 x 20 rows: enough that the layers are joined (`joining_pays`)
    linears = _linears((6,), out_shapes, common.FP32)
    x = np.random.default_rng(4).standard_normal((3, 20, 6))
    assert joining_pays(jnp.asarray(x), [lin.kernel[...] for lin in linears], 1)
    got = common.jit(lambda ls, x: project_jointly(x, ls))(linears, jnp.asarray(x, jnp.float32))
    assert len(got) == len(linears)
    for y, lin in zip(got, linears):
        w = common.params_f64(lin)["kernel"]
        common.assert_close(y, np.tensordot(x, w, axes=1), 1e-5, 1e-6)


def _value_and_grads(fn, linears, x):
    """fn(linears, x) -> outputs; (outputs, d sum_i <y_i, c_i> / d (x, kernels)) for fixed
    random cotangents c_i."""

    def loss(ls, x):
        ys = fn(ls, x)
        return sum(jnp.vdot(y, jax.random.normal(jax.random.key(i), y.shape)) for i, y in enumerate(ys)), ys

    (_, ys), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(linears, x)
    return ys, grads


def test_joint_fp8_projection_quantizes_like_each_layer():
    # output widths that are multiples of the 128 block: the joint weight's 128 x 128 blocks and
    # dy's 1 x 128 tiles are the layers' own, so outputs and gradients agree to fp32 summation
    # order (fp32 compute dtype): rtol 1e-5
    policy = PrecisionPolicy("fp8_fp32", jnp.float32, fp8=FP8_DEEPSEEK)
    linears = _linears((256,), [(128,), (256,)], policy)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((800, 256)), jnp.float32)
    assert joining_pays(x, [lin.kernel[...] for lin in linears], 1)
    joint = _value_and_grads(lambda ls, x: project_jointly(x, ls), linears, x)
    each = _value_and_grads(lambda ls, x: [lin(x) for lin in ls], linears, x)
    for got, want in zip(jax.tree.leaves(joint), jax.tree.leaves(each)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows, joined", [(4, False), (14, False), (15, True), (64, True)])
def test_layers_are_joined_only_when_it_saves_bytes(rows, joined):
    # out widths 5 + 3 + 7 = 15, n = 3: joined iff rows x 2 >= 2 x 15; the lowered program has one
    # dot and a concatenation of the kernels when joined, three dots and no concatenation when not
    linears = _linears((6,), [(5,), (3,), (7,)], common.FP32)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((rows, 6)), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda ls, x: project_jointly(x, ls))(linears, x))
    assert (jaxpr.count("dot_general"), "concatenate" in jaxpr) == ((1, True) if joined else (3, False))
    for got, lin in zip(project_jointly(x, linears), linears):
        np.testing.assert_allclose(np.asarray(got), np.asarray(lin(x)), rtol=1e-6, atol=1e-6)


def test_layers_of_different_precision_run_one_by_one():
    policy = PrecisionPolicy("fp8_a", jnp.float32, fp8=FP8_DEEPSEEK, fp8_layers=("a",))
    linears = _linears((128,), [(128,), (128,)], policy)
    x = jnp.asarray(np.random.default_rng(6).standard_normal((4, 128)), jnp.float32)
    for got, lin in zip(project_jointly(x, linears), linears):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(lin(x)))


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
    lin = common.build(
        lambda: Linear((6,), (4,), ("embed", "mlp"), name="t", std=1.0, policy=common.BF16, rngs=nnx.Rngs(0)),
        seed=5,
    )
    assert _call(lin, jnp.ones((1, 6), jnp.float32)).dtype == jnp.bfloat16


def test_swiglu_matches_reference():
    # fp32 vs float64: rtol 1e-5, atol 1e-6
    mlp = common.build(lambda: SwiGLU(16, 24, std=1.0, policy=common.FP32, rngs=nnx.Rngs(0)), seed=6)
    p = common.params_f64(mlp)
    x = np.random.default_rng(3).standard_normal((4, 16))
    want = ref.swiglu(x, p["w_gate"]["kernel"], p["w_up"]["kernel"], p["w_down"]["kernel"])
    common.assert_close(_call(mlp, jnp.asarray(x, jnp.float32)), want, 1e-5, 1e-6)
