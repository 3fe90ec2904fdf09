"""Redundant experts under expert parallelism (8 fake CPU devices, expert axis 8): the experts
run on E + R physical slots of a placement; outputs and gradients equal the model without
replicas, each assignment goes to the copy round-robin by token position, and the per-device
token counts of a skewed load fall when the hot experts are replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.config import MeshConfig
from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.moe import RoutedExperts
from frontier_jax.ops.routing import Routing
from frontier_jax.parallel.expert import ExpertParallel, expert_dispatcher, received_per_device
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.parallel.placement import Placement
from frontier_jax.parallel.rules import DEFAULT_RULES, use_sharding
from frontier_jax.precision import get_policy
from tests.model import common
from tests.parallel.hot_experts import replicate_hot

E, K, D, F, N = 8, 2, 16, 8, 64  # experts, top-k, width, expert width, tokens
EP, R = 8, 8  # expert devices, redundant slots: S = 16 slots, 2 per device
# experts 0 and 1 are hot: 4 and 3 extra copies, expert 2 one; copies spread over the devices
HOT = [0, 1, 0, 1, 0, 2, 0, 1, 3, 4, 5, 6, 7, 0, 1, 2]


def _cfg():
    return ModelConfig(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_ffn_dim=F,
        n_group=4,
        topk_group=2,
        init_std=0.3,
    )


def _skewed_inputs(seed=0):
    """Tokens whose first choice is expert 0 or 1 three times out of four."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    experts = []
    for _ in range(N):
        first = rng.choice([0, 1]) if rng.random() < 0.75 else rng.integers(E)
        experts.append([first, rng.choice([e for e in range(E) if e != first])])
    weights = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
    return x, np.asarray(experts, np.int32), weights


def _layers(placement: Placement, seed=1):
    """(the layer without replicas, the same experts on `placement`'s slots) over expert 8."""
    mesh = build_mesh(MeshConfig(data=1, expert=EP))
    make = lambda impl: RoutedExperts(  # noqa: E731
        _cfg(),
        policy=get_policy("fp32"),
        impl=impl,
        experts=ExpertParallel(mesh, DEFAULT_RULES),
        rngs=nnx.Rngs(seed),
    )
    plain, placed = make(ImplConfig()), make(ImplConfig(expert_replicas=placement.replicas))
    for name in ("physical_to_logical", "logical_to_physical", "copies"):
        getattr(placed, name).value = jnp.asarray(getattr(placement, name)[0])
    return mesh, plain, placed


def test_replicas_give_the_same_outputs_and_gradients_as_the_logical_experts():
    # fp32, rtol 1e-5 / atol 1e-6: the same products, summed in another order
    placement = Placement.from_physical(np.asarray([HOT]), E)
    mesh, plain, placed = _layers(placement)
    np.testing.assert_array_equal(placed.w_up[...], plain.w_up[...])  # same logical weights
    x, experts, weights = _skewed_inputs()
    cotangent = jax.random.normal(jax.random.key(0), (N, D))

    def loss(layer, x, routing):
        y = layer(x, routing).y
        return jnp.sum(y * cotangent), y

    routing = Routing(jnp.asarray(weights), jnp.asarray(experts), None)
    with use_sharding(mesh):
        step = common.fast_jit(nnx.grad(loss, has_aux=True))
        grads_plain, y_plain = step(plain, x, routing)
        grads_placed, y_placed = step(placed, x, routing)
    np.testing.assert_allclose(y_placed, y_plain, rtol=1e-5, atol=1e-6)
    for name in ("w_gate", "w_up", "w_down"):  # the copies' gradients sum back onto the logical weights
        assert grads_placed[name].value.shape == (E,) + grads_plain[name].value.shape[1:]
        np.testing.assert_allclose(grads_placed[name].value, grads_plain[name].value, rtol=1e-5, atol=1e-6)


def _naive_counts(experts, placement, devices):
    """Assignments each device receives: token t's choice e goes to slot l2p[e, t mod copies[e]]."""
    per_device = placement.num_slots // devices
    counts, remote, n = np.zeros(devices), 0, len(experts)
    for t, chosen in enumerate(experts):
        for e in chosen:
            slot = placement.logical_to_physical[0, e, t % placement.copies[0, e]]
            counts[slot // per_device] += 1
            remote += slot // per_device != t // (n // devices)  # token t sits on device t // (N / D)
    return counts, remote


def test_per_device_counts_fall_on_a_skewed_load_and_match_the_dispatch():
    x, experts, weights = _skewed_inputs(2)
    load = np.bincount(experts.reshape(-1), minlength=E)[None]
    placement = replicate_hot(load, replicas=R, devices=EP)
    before = received_per_device(experts[None], Placement.identity(1, E), EP)[0]
    after = received_per_device(experts[None], placement, EP)[0]
    np.testing.assert_array_equal(before, np.bincount(experts.reshape(-1) // (E // EP), minlength=EP))
    counts, remote = _naive_counts(experts, placement, EP)
    np.testing.assert_array_equal(after, counts)
    assert before.sum() == after.sum() == N * K
    # max/mean per device: 1.88 without replicas, 1.19 with the hot experts replicated
    assert after.max() / after.mean() < 1.25 < 1.8 < before.max() / before.mean()
    # the dispatch routes as counted: its all-to-all bytes are those of the remote rows
    mesh, _, placed = _layers(placement)
    with use_sharding(mesh):
        out = common.fast_jit(lambda layer, x, r: layer(x, r))(placed, x, Routing(weights, experts, None))
    assert float(out.a2a_bytes) == 2 * remote * D * 4


def test_training_forward_with_replicas_equals_the_model_without():
    # fp32 logits, rtol 1e-5 / atol 1e-5: the tiny model's MoE layers on 16 slots of 8 devices
    cfg = common.tiny_config(vocab_size=64, mtp_depth=0)
    mesh = build_mesh(MeshConfig(data=1, expert=EP))
    experts = expert_dispatcher(mesh, DEFAULT_RULES)
    plain = common.build(lambda: Transformer(cfg, experts=experts, rngs=nnx.Rngs(0)), seed=4)
    placed = nnx.eval_shape(
        lambda: Transformer(cfg, impl=ImplConfig(expert_replicas=R), experts=experts, rngs=nnx.Rngs(0))
    )
    placement = Placement.from_physical(np.asarray([HOT, HOT[::-1]]), E)
    slots = {"physical_to_logical": placement.physical_to_logical}
    slots |= {"logical_to_physical": placement.logical_to_physical, "copies": placement.copies}
    state = nnx.state(plain).to_pure_dict()
    state["moe_layers"]["blocks"]["ffn"]["experts"] |= slots
    nnx.update(placed, state)
    ids = jax.random.randint(jax.random.key(1), (8, 6), 0, cfg.vocab_size)
    with use_sharding(mesh):
        forward = common.fast_jit(lambda model, ids: model.forward(ids).logits)
        np.testing.assert_allclose(forward(placed, ids), forward(plain, ids), rtol=1e-5, atol=1e-5)


def test_placements_that_cannot_run_are_one_line_errors():
    with pytest.raises(ValueError, match=r"impl.expert_replicas=8 needs expert parallelism"):
        RoutedExperts(_cfg(), policy=get_policy("fp32"), impl=ImplConfig(expert_replicas=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"impl.expert_replicas=0 is invalid"):
        ImplConfig(expert_replicas=0).validate()
    mesh = build_mesh(MeshConfig(data=1, expert=EP))
    placed = RoutedExperts(  # 11 slots over 8 devices
        _cfg(),
        policy=get_policy("fp32"),
        impl=ImplConfig(expert_replicas=3),
        experts=ExpertParallel(mesh, DEFAULT_RULES),
        rngs=nnx.Rngs(0),
    )
    x, experts, weights = _skewed_inputs()
    with pytest.raises(
        ValueError, match=r"11 expert slots .* do not split over the expert mesh axis \(8 devices\)"
    ):
        with use_sharding(mesh):
            placed(jnp.asarray(x), Routing(jnp.asarray(weights), jnp.asarray(experts), None))
