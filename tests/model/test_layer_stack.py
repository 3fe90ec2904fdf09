"""`impl.scan_layers=false` (a Python loop over the stacked parameters' layer slices) against the
scanned stack: same logits, loss, MoE statistics and gradients of every parameter for remat none /
full / experts, same prefill + decode through the latent cache, and a lowered program without a
loop or stacked-residual writes; fp32 on a tiny MoE model (1 dense + 2 MoE layers)."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model import Transformer
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import ModelCache, Pages, empty_cache

from . import common

CFG = dict(num_layers=3, first_k_dense=1, mtp_depth=0)  # a dense stack of 1 layer, a MoE stack of 2


def _model(scan_layers: bool, remat: str = "none") -> Transformer:
    cfg = common.tiny_config(**CFG)
    impl = ImplConfig(remat=remat, scan_layers=scan_layers)
    return common.build(lambda: Transformer(cfg, impl=impl, rngs=nnx.Rngs(0)), seed=11)


def _loss_stats_and_grads(model: Transformer):
    ids = jnp.asarray(common.token_ids(model.cfg, 4))
    r = jnp.asarray(
        np.random.default_rng(9).standard_normal((common.B, common.T, model.cfg.vocab_size)), jnp.float32
    )

    def loss(m):
        out = m.forward(ids)
        return (out.logits * r).sum() + out.moe_stats.balance_loss.sum(), out

    (value, out), grads = common.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return float(value), jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, grads.to_pure_dict())


def _assert_trees_close(got, want, rtol, what):
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    flat_got = jax.tree.leaves(got)
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, w), g in zip(flat_want, flat_got):
        assert g.shape == w.shape, f"{what}{jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(
            g,
            w,
            rtol=rtol,
            atol=rtol * max(np.abs(w).max(), 1e-30),
            err_msg=f"{what}{jax.tree_util.keystr(path)}",
        )


@pytest.mark.parametrize("remat", ["none", "full", "experts"])
def test_unrolled_stack_gives_the_scanned_logits_stats_loss_and_gradients(remat):
    # same operations in the same order per layer (XLA may fuse / reorder fp32 sums differently):
    # loss and every output / MoE statistic / parameter gradient agree to rtol 1e-5 with
    # atol 1e-5 * max|reference tensor|
    scanned, unrolled = _model(True, remat), _model(False, remat)
    _assert_trees_close(
        nnx.state(unrolled).to_pure_dict(), nnx.state(scanned).to_pure_dict(), 0.0, "params"
    )  # the same parameter tree, logical axes aside
    want_loss, want_out, want_grads = _loss_stats_and_grads(scanned)
    loss, out, grads = _loss_stats_and_grads(unrolled)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert out.moe_stats.load.shape == (2, common.tiny_config(**CFG).n_routed_experts)  # stacked [L, ...]
    _assert_trees_close(out, want_out, 1e-5, "output")
    _assert_trees_close(grads, want_grads, 1e-5, "grad")


def test_unrolled_stack_keeps_logical_axes_and_applies_remat_per_layer():
    axes = lambda m: jax.tree.map(  # noqa: E731
        lambda v: v.get_metadata().get("logical_axes"),
        nnx.state(m),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    cfg = common.tiny_config(**CFG)
    abstract = lambda impl: nnx.eval_shape(lambda: Transformer(cfg, impl=impl, rngs=nnx.Rngs(0)))  # noqa: E731

    def checkpoints(remat):
        graphdef, state = nnx.split(abstract(ImplConfig(remat=remat, scan_layers=False)))
        ids = jnp.zeros((common.B, common.T), jnp.int32)
        return _count(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids).sum())(state).jaxpr, "remat2")

    assert axes(abstract(ImplConfig(scan_layers=False))) == axes(abstract(ImplConfig()))
    # full: one checkpoint per block (3); experts: one per MoE block (2); none: none
    assert (checkpoints("full"), checkpoints("experts"), checkpoints("none")) == (3, 2, 0)


def _count(jaxpr, primitive: str) -> int:
    """Equations of `primitive` in jaxpr and its sub-jaxprs."""
    return sum(
        (eqn.primitive.name == primitive)
        + sum(_count(sub, primitive) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


@pytest.mark.parametrize("scan_layers", [True, False])
def test_unrolled_gradient_program_has_no_loop_and_no_stacked_residual_writes(scan_layers):
    # remat none: the scan stacks each layer's residuals into [L, ...] buffers inside a while loop
    # (dynamic_update_slice per layer); the unrolled stack keeps them as per-layer values
    cfg = common.tiny_config(**CFG)
    impl = ImplConfig(scan_layers=scan_layers)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, impl=impl, rngs=nnx.Rngs(0))))
    ids = jnp.zeros((common.B, common.T), jnp.int32)
    grad = jax.grad(lambda s: nnx.merge(graphdef, s)(ids).sum())
    text = jax.jit(grad).lower(state).as_text()
    loops, writes = text.count("stablehlo.while"), text.count("stablehlo.dynamic_update_slice")
    if scan_layers:
        assert loops >= 2 and writes >= 2  # forward and backward scans of each stack; residual stacking
    else:
        assert (loops, writes) == (0, 0)


def _pages(block: int, rows: int, tokens: int, width: int, start: int):
    """Pages for `width` new tokens at positions start.. of each row, every row owning its own
    blocks for `tokens` tokens -> (pages, positions [rows, width], blocks in the pool)."""
    per_seq = -(-tokens // block)
    table = 1 + np.arange(rows * per_seq, dtype=np.int32).reshape(rows, per_seq)
    write = np.ones((rows, width), bool)
    positions = np.broadcast_to(np.arange(start, start + width, dtype=np.int32), (rows, width))
    return Pages(jnp.asarray(table), jnp.asarray(write)), jnp.asarray(positions), 1 + rows * per_seq


def test_unrolled_extend_gives_the_scanned_prefill_and_decode():
    # a prefill chunk of T tokens then one absorbed decode step from an empty cache: hidden states
    # and every cache entry agree to rtol 1e-5 (atol 1e-5 * max|value|)
    cfg = common.tiny_config(**CFG)
    ids = jnp.asarray(common.token_ids(cfg, 2))
    results = []
    for scan_layers in (True, False):
        model = _model(scan_layers)
        graphdef, state = nnx.split(model)
        pages, positions, num_blocks = _pages(4, common.B, common.T + 1, common.T, 0)

        def stack(n):
            return empty_cache(n, num_blocks, 4, cfg.kv_lora_rank, cfg.qk_rope_head_dim, jnp.float32)

        cache = ModelCache(stack(cfg.first_k_dense), stack(cfg.num_moe_layers), None)  # no MTP

        def extend(state, ids, positions, cache, pages, absorbed):
            hidden, cache, _ = nnx.merge(graphdef, state).extend(
                ids, positions, cache, ExtendContext(pages, absorbed)
            )
            return hidden, cache

        extend = common.fast_jit(extend, static_argnums=5)
        g_prefill, cache = extend(state, ids, positions, cache, pages, False)
        step_pages, step_positions, _ = _pages(4, common.B, common.T + 1, 1, common.T)
        g_decode, cache = extend(state, ids[:, :1], step_positions, cache, step_pages, True)
        results.append(jax.tree.map(np.asarray, (g_prefill, g_decode, cache)))
    _assert_trees_close(results[1], results[0], 1e-5, "extend")
