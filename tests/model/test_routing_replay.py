"""Routing replay (`Transformer.hidden/forward(routed_experts=...)`): the MoE layers run the given
experts with gates from the current router, against the float64 reference model replaying the
same experts; replaying the selection the model makes itself leaves the forward unchanged; the
router gets the gradient of the gates (central differences of the float64 reference); a pipeline
chunk's slice of the replay (`SequenceInputs.layer_range`) equals the whole stack's.

Tolerances (fp32 vs float64 through 3 blocks): logits rtol 1e-4, atol 5e-5 on O(5) logits, as the
transformer tests; the model's own selection replayed: atol 1e-6 (the same fp32 computation);
router directional derivative rtol 1e-3 against a float64 central difference (eps 1e-4: the
replayed function is smooth in the router weights, no selection can flip)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.block import SequenceInputs

from . import common
from . import reference as ref


def distinct_experts(cfg, shape, seed: int) -> np.ndarray:
    """Random routed_experts [*shape, K]: K distinct expert ids per token and layer (as a
    selection has), int32."""
    rng = np.random.default_rng(seed)
    flat = [
        rng.permutation(cfg.n_routed_experts)[: cfg.num_experts_per_tok] for _ in range(int(np.prod(shape)))
    ]
    return np.asarray(flat, np.int32).reshape(*shape, cfg.num_experts_per_tok)


@common.jit
def replayed(model, ids, routed_experts):
    return model.forward(ids, with_mtp=False, routed_experts=routed_experts)


@common.jit
def routed(model, ids):
    return model.forward(ids, with_mtp=False)


def test_replayed_experts_run_gated_by_the_current_router_as_the_float64_reference(dense_moe_model):
    cfg, model = dense_moe_model
    ids = common.token_ids(cfg, 3)
    replay = distinct_experts(cfg, (common.B, common.T, cfg.num_moe_layers), seed=4)
    out = replayed(model, jnp.asarray(ids), jnp.asarray(replay))
    want = ref.transformer(common.params_f64(model), ids, cfg, routed_experts=replay)
    common.assert_close(out.logits, want["logits"], rtol=1e-4, atol=5e-5)
    # the statistics count the replayed selection: loads exactly, balance losses rtol 1e-5
    np.testing.assert_array_equal(np.asarray(out.moe_stats.load), [s["load"] for s in want["moe_stats"]])
    np.testing.assert_allclose(
        np.asarray(out.moe_stats.balance_loss), [s["balance_loss"] for s in want["moe_stats"]], rtol=1e-5
    )
    own = routed(model, jnp.asarray(ids))
    assert np.abs(np.asarray(out.logits - own.logits)).max() > 0.1  # other experts, other output


def test_replaying_the_models_own_selection_leaves_the_forward_unchanged(dense_moe_model):
    cfg, model = dense_moe_model
    ids = common.token_ids(cfg, 5)
    want = ref.transformer(common.params_f64(model), ids, cfg)
    own = np.stack([s["experts"] for s in want["moe_stats"]], axis=2).astype(np.int32)  # [B, T, L, K]
    out = replayed(model, jnp.asarray(ids), jnp.asarray(own))
    plain = routed(model, jnp.asarray(ids))
    common.assert_close(out.logits, plain.logits, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.moe_stats.load), np.asarray(plain.moe_stats.load))
    common.assert_close(out.logits, want["logits"], rtol=1e-4, atol=5e-5)


def test_the_router_gets_the_gradient_of_the_gates_under_replay(dense_moe_model):
    """d/de sum(c * logits(W_r + e V)) at e = 0 for a random direction V of every MoE layer's
    router weights: jax's gradient . V against the float64 reference's central difference."""
    cfg, model = dense_moe_model
    ids = common.token_ids(cfg, 6)
    replay = distinct_experts(cfg, (common.B, common.T, cfg.num_moe_layers), seed=8)
    rng = np.random.default_rng(2)
    c = rng.standard_normal((common.B, common.T, cfg.vocab_size))
    kernel = nnx.state(model)["moe_layers"]["blocks"]["ffn"]["router"]["kernel"]
    direction = rng.standard_normal(kernel.shape)

    def loss(m):
        return (
            m.forward(jnp.asarray(ids), with_mtp=False, routed_experts=jnp.asarray(replay)).logits * c
        ).sum()

    grads = common.jit(nnx.grad(loss))(model)
    d_router = np.asarray(grads["moe_layers"]["blocks"]["ffn"]["router"]["kernel"][...], np.float64)
    assert np.abs(d_router).max() > 0

    params = common.params_f64(model)

    def ref_loss(step):
        moved = jax.tree.map(lambda a: a, params)
        moved["moe_layers"]["blocks"]["ffn"]["router"]["kernel"] = (
            params["moe_layers"]["blocks"]["ffn"]["router"]["kernel"] + step * direction
        )
        return (ref.transformer(moved, ids, cfg, routed_experts=replay)["logits"] * c).sum()

    eps = 1e-4
    numeric = (ref_loss(eps) - ref_loss(-eps)) / (2 * eps)
    np.testing.assert_allclose((d_router * direction).sum(), numeric, rtol=1e-3)


def test_a_pipeline_chunk_replays_its_own_layers_of_the_record(dense_moe_model):
    """The MoE stack (2 layers) run as 2 chunks of 1 layer, chunk c reading
    `layer_range(c, 1)` with c traced (as `train.strategy.PipelineStages` does), equals the whole
    stack (atol 1e-6); a replay whose layer count is not the stack's is refused, naming the shape."""
    cfg, model = dense_moe_model
    stack = model.moe_layers
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((common.B, common.T, cfg.hidden_size)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(common.T), (common.B, common.T))
    replay = jnp.asarray(distinct_experts(cfg, (common.B, common.T, cfg.num_moe_layers), seed=3))
    inputs = SequenceInputs(positions, None, jnp.ones((common.B, common.T), jnp.int32), replay)
    graphdef, state = nnx.split(stack)

    @common.fast_jit
    def whole(state, x, inputs):
        return nnx.merge(graphdef, state)(x, inputs)

    @common.fast_jit
    def chunked(state, x, inputs):
        for c in range(cfg.num_moe_layers):
            part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, c, 1), state)
            x, _ = nnx.merge(graphdef, part)(x, inputs.layer_range(jnp.int32(c), 1))
        return x

    want, _ = whole(state, x, inputs)
    common.assert_close(chunked(state, x, inputs), want, rtol=0, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"routed_experts of shape \(2, 8, 1, 2\) for an MoE stack of 2 layers"
    ):
        nnx.merge(graphdef, state)(x, inputs.layer_range(0, 1))
