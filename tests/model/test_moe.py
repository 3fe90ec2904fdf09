"""DeepSeekMoE layer: dropless and capacity dispatch against a naive per-token loop over the
selected experts, drop counts, expert loads, the sequence-wise balance loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.config import ImplConfig
from frontier_jax.model.moe import MoE

from . import common
from . import reference as ref

B, T = 3, 12
MASK = np.ones((B, T), np.int32)
MASK[1, 8:] = 0  # padding at the end of row 1
MASK[2, :] = 0  # row 2 is all padding


def _moe(seed=0, impl=ImplConfig(), **overrides):
    cfg = common.tiny_config(**overrides)
    return cfg, common.build(lambda: MoE(cfg, policy=common.FP32, impl=impl, rngs=nnx.Rngs(0)), seed)


_apply = common.jit(lambda m, x, mask: m(x, mask))


def _x(cfg, seed=1):
    return np.random.default_rng(seed).standard_normal((B, T, cfg.hidden_size))


def _run(moe, x, mask=MASK):
    y, stats = _apply(moe, jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    return np.asarray(y), jax.tree.map(np.asarray, stats)


SOFTMAX_NO_SHARED = dict(
    n_shared_experts=0, scoring_func="softmax", norm_topk_prob=False, num_experts_per_tok=3
)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # V3-style: sigmoid, 4 groups / top-2 groups, 1 shared expert, scaling 2.5
        dict(n_shared_experts=2, n_group=1, topk_group=1, routed_scaling_factor=1.0),
        SOFTMAX_NO_SHARED,
    ],
    ids=["v3", "two_shared_ungrouped", "softmax_no_shared"],
)
def test_dropless_matches_naive_per_token_loop(overrides):
    # fp32 vs float64: rtol 1e-4, atol 1e-5 on O(1) outputs
    cfg, moe = _moe(**overrides)
    x = _x(cfg)
    y, stats = _run(moe, x)
    want = ref.moe(common.params_f64(moe), x.reshape(B * T, -1), cfg, token_mask=MASK)
    common.assert_close(y.reshape(B * T, -1), want["y"], rtol=1e-4, atol=1e-5)
    assert stats.dropped == 0


def test_pallas_grouped_gemm_matches_naive_loop_and_ragged_dot_gradients():
    # the Pallas kernel (interpreted on CPU) with tile-aligned dispatch: output vs the float64
    # loop (rtol 1e-4, atol 1e-5) and every parameter gradient vs the ragged_dot path (fp32,
    # different summation orders: ||ours - theirs|| / ||theirs|| < 1e-5 per parameter)
    cfg, moe = _moe(seed=6, moe_ffn_dim=16, impl=ImplConfig(gmm="pallas"))
    ref_cfg, ref_moe = _moe(seed=6, moe_ffn_dim=16, impl=ImplConfig(gmm="ragged_dot"))
    x = _x(cfg, 7)
    y, stats = _run(moe, x)
    want = ref.moe(common.params_f64(moe), x.reshape(B * T, -1), cfg, token_mask=MASK)
    common.assert_close(y.reshape(B * T, -1), want["y"], rtol=1e-4, atol=1e-5)

    def grads(module):
        def loss(m):
            y, _ = m(jnp.asarray(x, jnp.float32), jnp.asarray(MASK))
            return jnp.sum(jnp.sin(y))

        return nnx.state(nnx.grad(loss)(module), nnx.Param).to_pure_dict()

    ours, theirs = grads(moe), grads(ref_moe)
    rel = jax.tree.map(lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b), ours, theirs)
    assert max(jax.tree.leaves(rel)) < 1e-5, rel
    assert np.abs(ours["experts"]["w_down"]).max() > 0


@pytest.mark.parametrize("gmm_gather", ["dispatch", "fused"])
def test_row_moves_in_the_kernel_equal_the_xla_gathers_in_output_and_gradients(gmm_gather):
    # impl.gmm_gather=dispatch (token rows gathered in the Pallas gate/up kernel's loads) and
    # fused (also the down kernel's rows stored in token order, its gradients read gate-scaled;
    # interpreted on CPU) against the XLA gathers: the same products, fp32; only sums differ in
    # order: output rtol 1e-6, every parameter's (the router's through the gates included) and
    # the input's gradient ||fused - xla|| / ||xla|| < 1e-6
    impl = ImplConfig(gmm="pallas")
    cfg, moe = _moe(seed=8, moe_ffn_dim=16, impl=impl)
    _, fused = _moe(seed=8, moe_ffn_dim=16, impl=impl.replace(gmm_gather=gmm_gather))
    x = jnp.asarray(_x(cfg, 9), jnp.float32)
    kernels = lambda m: str(jax.make_jaxpr(lambda x: m(x, jnp.asarray(MASK)))(x))
    assert "grouped_gemm_rows_gathered" in kernels(fused) and "gathered" not in kernels(moe)
    assert ("grouped_gemm_rows_scattered" in kernels(fused)) == (gmm_gather == "fused")

    def value_and_grads(module):
        def loss(m, x):
            y, stats = m(x, jnp.asarray(MASK))
            return jnp.sum(jnp.sin(y)) + stats.balance_loss, y

        (_, y), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(module, x)
        return np.asarray(y), {"x": np.asarray(g_x), **nnx.state(g_params, nnx.Param).to_pure_dict()}

    (y_xla, g_xla), (y_fused, g_fused) = value_and_grads(moe), value_and_grads(fused)
    np.testing.assert_allclose(y_fused, y_xla, rtol=1e-6, atol=1e-7)
    rel = jax.tree.map(lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b), g_fused, g_xla)
    assert max(jax.tree.leaves(rel)) < 1e-6, rel
    assert np.abs(g_fused["experts"]["w_gate"]).max() > 0 and np.abs(g_fused["x"]).max() > 0
    assert np.abs(g_fused["router"]["kernel"]).max() > 0


def test_capacity_with_large_factor_equals_dropless():
    # capacity_factor = N_r / K gives C = N: nothing can be dropped.  Different matmul kernels
    # (grouped vs batched) sum in different orders, so "equal" means equal to fp32 rounding of
    # O(5) outputs: rtol 1e-5, atol 2e-5 (observed max difference 4e-6).
    cfg, dropless = _moe(seed=3)
    cap_cfg, capacity = _moe(seed=3, impl=ImplConfig(moe_dispatch="capacity", moe_capacity_factor=4.0))
    assert ref.capacity(cap_cfg, B * T, 4.0) == B * T
    x = _x(cfg, 2)
    y0, s0 = _run(dropless, x)
    y1, s1 = _run(capacity, x)
    real = MASK == 1  # (padding tokens get no routed output under capacity dispatch)
    np.testing.assert_allclose(y1[real], y0[real], rtol=1e-5, atol=2e-5)
    assert s1.dropped == 0
    np.testing.assert_array_equal(s1.load, s0.load)
    assert s1.balance_loss == s0.balance_loss


LEADING_PADDING = np.ones((B, T), np.int32)
LEADING_PADDING[0, :5] = 0  # padding ahead of real tokens in token order
LEADING_PADDING[1, 8:] = 0


@pytest.mark.parametrize("mask", [MASK, LEADING_PADDING], ids=["trailing_padding", "leading_padding"])
def test_capacity_drops_match_first_come_naive_count(mask):
    # each expert keeps its first C = ceil(f N K / N_r) assignments of real tokens in token
    # order (padding takes no place and is not counted as dropped): the dropped count equals the
    # naive count exactly and the output equals the naive loop that skips the dropped
    # assignments (rtol 1e-4, atol 1e-5)
    factor = 0.5
    cfg, moe = _moe(seed=4, impl=ImplConfig(moe_dispatch="capacity", moe_capacity_factor=factor))
    x = _x(cfg, 5)
    y, stats = _run(moe, x, mask)
    want = ref.moe(common.params_f64(moe), x.reshape(B * T, -1), cfg, token_mask=mask, capacity_factor=factor)
    assert want["dropped"] > 0  # the test is about drops
    assert int(stats.dropped) == want["dropped"]
    common.assert_close(y.reshape(B * T, -1), want["y"], rtol=1e-4, atol=1e-5)
    # load counts assignments before dropping
    np.testing.assert_array_equal(stats.load, want["load"])


def test_load_counts_assignments_of_real_tokens_only():
    cfg, moe = _moe(seed=6)
    x = _x(cfg, 7)
    _, stats = _run(moe, x)
    want = ref.moe(common.params_f64(moe), x.reshape(B * T, -1), cfg, token_mask=MASK)
    np.testing.assert_array_equal(stats.load, want["load"])
    assert stats.load.sum() == MASK.sum() * cfg.num_experts_per_tok
    _, unmasked = _run(moe, x, np.ones((B, T), np.int32))
    assert unmasked.load.sum() == B * T * cfg.num_experts_per_tok
    # masking changes the statistics only, never the outputs
    np.testing.assert_array_equal(_run(moe, x)[0], _run(moe, x, np.ones((B, T), np.int32))[0])


@pytest.mark.parametrize("overrides", [dict(), SOFTMAX_NO_SHARED], ids=["sigmoid", "softmax"])
def test_sequence_balance_loss_matches_reference(overrides):
    # rows: one full, one padded, one entirely padding (adds 0 to the sum over rows); rtol 1e-5
    cfg, moe = _moe(seed=8, **overrides)
    x = _x(cfg, 9)
    _, stats = _run(moe, x)
    want = ref.moe(common.params_f64(moe), x.reshape(B * T, -1), cfg, token_mask=MASK)
    loss = ref.sequence_balance_loss(
        want["experts"].reshape(B, T, -1), want["scores"].reshape(B, T, -1), MASK, cfg
    )
    np.testing.assert_allclose(stats.balance_loss, loss, rtol=1e-5)
    # sanity of the reference itself: each of the 2 real rows' L lies in (0, N_r]
    assert 0 < loss <= 2 * cfg.n_routed_experts


def test_gradients_match_finite_differences_of_reference_and_reach_router():
    # d/dx of sum(y * r): JAX fp32 reverse mode vs central differences (h = 1e-5) of the float64
    # reference on a few coordinates (routing is piecewise constant there, gates differentiable):
    # rtol 2e-3, atol 2e-4.  Parameter gradients: finite, non-zero for the router kernel (through
    # the gates) and for every expert with assignments; the selection bias gets none.
    cfg, moe = _moe(seed=10)
    x = _x(cfg, 11)
    r = np.random.default_rng(12).standard_normal(x.shape)
    p = common.params_f64(moe)

    def loss(m, x):
        return (m(x, jnp.asarray(MASK))[0] * jnp.asarray(r, jnp.float32)).sum()

    grads, g = common.jit(nnx.grad(loss, argnums=(0, 1)))(moe, jnp.asarray(x, jnp.float32))
    g = np.asarray(g).reshape(B * T, -1)
    assert np.isfinite(g).all()

    def ref_loss(xt, t):  # only token t's output depends on x[t] (dropless)
        return float((ref.moe(p, xt[None], cfg)["y"][0] * r.reshape(B * T, -1)[t]).sum())

    flat = x.reshape(B * T, -1)
    h = 1e-5
    for t, j in [(0, 0), (5, 3), (17, 31), (30, 12)]:
        plus, minus = flat[t].copy(), flat[t].copy()
        plus[j] += h
        minus[j] -= h
        route = lambda v: ref.route_token(v @ p["router"]["kernel"], p["router"]["bias"], cfg)[0]
        assert route(plus) == route(minus)
        fd = (ref_loss(plus, t) - ref_loss(minus, t)) / (2 * h)
        np.testing.assert_allclose(g[t, j], fd, rtol=2e-3, atol=2e-4)

    named = {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(grads.to_pure_dict())[0]
    }
    assert all(np.isfinite(v).all() for v in named.values())
    assert np.abs(named["router/kernel"]).max() > 0
    assert not any("bias" in k for k in named)
    experts = ref.moe(p, flat, cfg)["experts"]
    used = np.isin(np.arange(cfg.n_routed_experts), experts)
    per_expert = np.abs(named["experts/w_down"]).reshape(cfg.n_routed_experts, -1).max(-1)
    assert (per_expert[used] > 0).all() and (per_expert[~used] == 0).all()


def test_tokamax_grouped_matmul_without_the_package_names_the_setting():
    import importlib.util

    from frontier_jax.ops.grouped_matmul import grouped_matmul

    if importlib.util.find_spec("tokamax") is not None:
        pytest.skip("tokamax installed")
    with pytest.raises(ImportError, match="impl.gmm"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([1, 3]), impl="tokamax")
    with pytest.raises(ValueError, match="impl.gmm"):
        grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([1, 3]), impl="megablox")


def test_grouped_matmul_matches_per_row_products_and_zero_tail():
    # out[r] = lhs[r] @ rhs[g(r)] for rows owned by a group, zeros past sum(group_sizes);
    # fp32 vs float64: rtol 1e-5, atol 1e-6
    from frontier_jax.ops.grouped_matmul import grouped_matmul

    rng = np.random.default_rng(20)
    lhs, rhs = rng.standard_normal((9, 4)), rng.standard_normal((3, 4, 5))
    sizes = np.array([2, 0, 4])  # rows 0-1 -> group 0, rows 2-5 -> group 2, rows 6-8 unowned
    got = common.fast_jit(lambda a, b, s: grouped_matmul(a, b, s, impl="ragged_dot", dtype=jnp.float32))(
        jnp.asarray(lhs, jnp.float32), jnp.asarray(rhs, jnp.float32), jnp.asarray(sizes)
    )
    owner = [0, 0, 2, 2, 2, 2]
    want = np.zeros((9, 5))
    for r, g in enumerate(owner):
        want[r] = lhs[r] @ rhs[g]
    common.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_capacity_dispatch_runs_the_experts_in_fp8_under_an_fp8_policy():
    # same routing, same drops; the output moves by fp8 rounding only: relative error vs the
    # bf16 policy between 1e-3 (fp8 really ran) and 0.1 (e4m3 keeps 3 mantissa bits, and
    # shared and routed experts chain three fp8 GEMMs each)
    from frontier_jax.precision import get_policy

    cfg = common.tiny_config(moe_ffn_dim=16)
    impl = ImplConfig(moe_dispatch="capacity", moe_capacity_factor=0.75)
    outputs = {}
    for name in ("bf16", "fp8_deepseek"):
        moe = common.build(lambda: MoE(cfg, policy=get_policy(name), impl=impl, rngs=nnx.Rngs(0)), 8)
        outputs[name] = _run(moe, _x(cfg, 9))
    (y16, s16), (y8, s8) = outputs["bf16"], outputs["fp8_deepseek"]
    assert s8.dropped == s16.dropped > 0
    rel = np.linalg.norm(y8.astype(np.float64) - y16) / np.linalg.norm(y16)
    assert 1e-3 < rel < 0.1, rel
