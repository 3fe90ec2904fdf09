"""The full model against the float64 reference (embedding -> dense blocks -> MoE blocks -> norm ->
head), packed documents, MoE statistics, remat policies, bf16 and the tied head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model import Transformer
from frontier_jax.model.config import ImplConfig
from frontier_jax.precision import get_policy

from . import common
from . import reference as ref


def _ref(model_and_cfg, ids, positions=None, segment_ids=None):
    cfg, model = model_and_cfg
    return ref.transformer(common.params_f64(model), ids, cfg, positions, segment_ids)


def test_logits_match_reference(any_model):
    # fp32 vs float64 through 2-3 blocks: rtol 1e-4, atol 5e-5 on O(5) logits
    cfg, model = any_model
    ids = common.token_ids(cfg, 1)
    out = common.forward(model, jnp.asarray(ids))
    want = _ref(any_model, ids)
    assert out.logits.shape == (common.B, common.T, cfg.vocab_size)
    assert out.logits.dtype == jnp.float32
    common.assert_close(out.logits, want["logits"], rtol=1e-4, atol=5e-5)


def test_moe_statistics_match_reference(any_model):
    # per-layer loads exactly, balance losses rtol 1e-5; no drops in dropless mode
    cfg, model = any_model
    ids = common.token_ids(cfg, 1)
    out = common.forward(model, jnp.asarray(ids))
    want = _ref(any_model, ids)
    n_moe = cfg.num_layers - cfg.first_k_dense
    assert out.moe_stats.load.shape == (n_moe, cfg.n_routed_experts)
    np.testing.assert_array_equal(
        np.asarray(out.moe_stats.load), np.stack([s["load"] for s in want["moe_stats"]])
    )
    np.testing.assert_allclose(
        np.asarray(out.moe_stats.balance_loss), [s["balance_loss"] for s in want["moe_stats"]], rtol=1e-5
    )
    np.testing.assert_array_equal(np.asarray(out.moe_stats.dropped), np.zeros(n_moe))


def test_packed_documents_match_reference(dense_moe_model):
    # segment ids with restarting positions and a padding tail: real tokens match the reference
    # (rtol 1e-4, atol 5e-5), everything is finite, loads count real tokens only
    cfg, model = dense_moe_model
    ids = common.token_ids(cfg, 2)
    seg, pos = common.PACKED_SEGMENTS, common.PACKED_POSITIONS
    out = common.forward(model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg))
    want = _ref(dense_moe_model, ids, pos, seg)
    real = seg != 0
    assert np.isfinite(np.asarray(out.logits)).all()
    common.assert_close(np.asarray(out.logits)[real], want["logits"][real], rtol=1e-4, atol=5e-5)
    common.assert_close(
        np.asarray(out.mtp_logits)[:, real], want["mtp_logits"][:, real], rtol=1e-4, atol=5e-5
    )
    np.testing.assert_array_equal(
        np.asarray(out.moe_stats.load).sum(-1), real.sum() * cfg.num_experts_per_tok
    )
    np.testing.assert_allclose(
        np.asarray(out.moe_stats.balance_loss), [s["balance_loss"] for s in want["moe_stats"]], rtol=1e-5
    )


def test_documents_do_not_see_each_other(dense_moe_model):
    # changing document 1 of row 0 leaves document 2's logits unchanged (atol 1e-5)
    cfg, model = dense_moe_model
    ids = common.token_ids(cfg, 3)
    ids2 = ids.copy()
    ids2[0, :3] = (ids2[0, :3] + 1) % cfg.vocab_size
    seg, pos = jnp.asarray(common.PACKED_SEGMENTS), jnp.asarray(common.PACKED_POSITIONS)
    a = np.asarray(common.forward(model, jnp.asarray(ids), pos, seg).logits)
    b = np.asarray(common.forward(model, jnp.asarray(ids2), pos, seg).logits)
    np.testing.assert_allclose(b[0, 3:7], a[0, 3:7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(b[1], a[1], rtol=0, atol=1e-5)
    assert np.abs(b[0, :3] - a[0, :3]).max() > 1e-3


def test_tied_embeddings_use_the_embedding_as_head(moe_only_tied_model):
    cfg, model = moe_only_tied_model
    assert model.head is None
    h = np.random.default_rng(4).standard_normal((3, cfg.hidden_size))
    e = common.params_f64(model)["embed"]["embedding"]
    logits = common.jit(lambda m, h: m.logits_from_hidden(h))(model, jnp.asarray(h, jnp.float32))
    common.assert_close(logits, h @ e.T, 1e-5, 1e-5)
    assert "head" not in common.params_f64(model)


def test_call_returns_forward_logits_without_mtp(dense_moe_model):
    cfg, model = dense_moe_model
    ids = jnp.asarray(common.token_ids(cfg, 1))

    @common.jit
    def both(m, ids):
        plain = m.forward(ids, with_mtp=False)
        assert plain.mtp_logits is None and plain.mtp_stats is None
        return m(ids), plain.logits

    called, plain = both(model, ids)
    full = common.forward(model, ids)
    np.testing.assert_allclose(np.asarray(called), np.asarray(plain), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(called), np.asarray(full.logits), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- remat / bf16

REMAT_CFG = dict(num_layers=2, first_k_dense=1, mtp_depth=0)


def _loss_and_grads(policy_name):
    cfg = common.tiny_config(**REMAT_CFG)
    impl = ImplConfig(remat=policy_name)
    model = common.build(lambda: Transformer(cfg, impl=impl, rngs=nnx.Rngs(0)), seed=5)
    ids = jnp.asarray(common.token_ids(cfg, 6))
    r = jnp.asarray(
        np.random.default_rng(7).standard_normal((common.B, common.T, cfg.vocab_size)), jnp.float32
    )

    def loss(m):
        logits = m(ids)
        return (logits * r).sum(), logits

    (_, logits), grads = common.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids).sum())(state))
    return np.asarray(logits), jax.tree.map(np.asarray, grads.to_pure_dict()), "remat" in jaxpr


_BASELINE = {}


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_attention_out", "experts"])
def test_remat_policies_give_identical_logits_and_gradients(policy):
    # same math recomputed (XLA may reorder fp32 sums): logits agree to rtol 1e-5, atol 1e-6 and
    # every parameter gradient to rtol 1e-5, atol 1e-5 * max|gradient of that tensor|
    if "none" not in _BASELINE:
        _BASELINE["none"] = _loss_and_grads("none")
    base_logits, base_grads, base_remat = _BASELINE["none"]
    logits, grads, remat = _loss_and_grads(policy)
    assert remat and not base_remat  # the policy really wraps the blocks (or experts) in a checkpoint
    np.testing.assert_allclose(logits, base_logits, rtol=1e-5, atol=1e-6)
    flat_base = jax.tree_util.tree_flatten_with_path(base_grads)[0]
    flat = jax.tree.leaves(grads)
    assert len(flat) == len(flat_base)
    for (path, want), got in zip(flat_base, flat):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(
            got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=jax.tree_util.keystr(path)
        )


def _weight_quantizations(jaxpr) -> int:
    """reduce_max equations over two or more axes longer than 1 in a jaxpr and its
    sub-jaxprs: the 2-D (128 x 128 block) amaxes of fp8_deepseek's weights (activations use
    1-D tiles)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_max":
            shape = eqn.invars[0].aval.shape
            count += sum(shape[axis] > 1 for axis in eqn.params["axes"]) >= 2
        for sub in jax.core.jaxprs_in_params(eqn.params):
            count += _weight_quantizations(sub)
    return count


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_attention_out", "experts"])
def test_remat_keeps_the_quantized_fp8_weights(policy):
    # the backward of a rematerialised layer reuses the forward's fp8 weights (FP8_WEIGHT):
    # as many weight quantizations in the gradient as without remat
    def count(remat):
        cfg = common.tiny_config(**REMAT_CFG)
        model = nnx.eval_shape(
            lambda: Transformer(
                cfg, impl=ImplConfig(remat=remat), policy=get_policy("fp8_deepseek"), rngs=nnx.Rngs(0)
            )
        )
        graphdef, state = nnx.split(model)
        ids = jnp.zeros((common.B, common.T), jnp.int32)
        grad = jax.grad(lambda s: nnx.merge(graphdef, s)(ids).astype(jnp.float32).sum())
        return _weight_quantizations(jax.make_jaxpr(grad)(state).jaxpr)

    assert count(policy) == count("none") > 0


def test_bf16_policy_logits_close_to_fp32(dense_moe_model):
    # bf16 activations (fp32 master weights, norms, router, softmax; fp32-accumulated matmuls) give
    # ~1% per-token relative error; a token whose top-K routing flips under bf16 rounding may
    # differ much more, so: per-token relative error median < 3e-2 and < 5e-2 on >= 80% of tokens
    # (observed: median 1.3e-2, one flipped token of 16 at 0.5)
    cfg, model = dense_moe_model
    bf16 = nnx.eval_shape(lambda: Transformer(cfg, policy=common.BF16, rngs=nnx.Rngs(0)))
    common.copy_state(model, bf16)
    ids = jnp.asarray(common.token_ids(cfg, 1))
    lo = common.forward(bf16, ids)
    hi = common.forward(model, ids)
    assert lo.logits.dtype == jnp.float32 and lo.mtp_logits.dtype == jnp.float32
    for a, b in [(lo.logits, hi.logits), (lo.mtp_logits, hi.mtp_logits)]:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        err = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)
        assert np.median(err) < 3e-2
        assert (err < 5e-2).mean() >= 0.8


def test_parameters_carry_logical_axes_with_layer_axis(dense_moe_model):
    cfg, model = dense_moe_model
    kernel = model.moe_layers.blocks.ffn.experts.w_gate
    assert kernel.get_metadata()["logical_axes"] == ("layers", "expert", "embed", "moe_mlp")
    assert kernel[...].shape == (
        cfg.num_layers - cfg.first_k_dense,
        cfg.n_routed_experts,
        cfg.hidden_size,
        cfg.moe_ffn_dim,
    )
    assert model.embed.embedding.get_metadata()["logical_axes"] == ("vocab", "embed")
