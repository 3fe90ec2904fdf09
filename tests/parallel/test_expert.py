"""Expert parallelism (all-to-all dispatch in shard_map) against naive numpy references, on 8
fake CPU devices laid out as data 2 x expert 4 (or data 2 x expert 2 x tensor 2).

Token shard i (of the data x expert ways along the batch axes data, fsdp, expert) sits at
expert coordinate i % EP and sends each assignment to device expert_id // (E / EP).  With
capacity dispatch each expert takes, from each shard, its first C = ceil(factor n K / E) real
tokens' assignments (n tokens per shard) -- the rule of the local dispatch applied per shard."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.config import MeshConfig
from frontier_jax.model import ModelConfig
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.moe import MoE, RoutedExperts
from frontier_jax.ops.routing import Routing
from frontier_jax.parallel.expert import ExpertParallel
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.parallel.rules import DEFAULT_RULES, use_sharding
from frontier_jax.precision import get_policy

E, K, D, F, N = 8, 2, 16, 8, 64  # experts, top-k, width, expert width, tokens
SHARDS, EP = 8, 4


def _cfg(**kw):
    base = dict(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_ffn_dim=F,
        n_group=4,
        topk_group=2,
        init_std=0.3,
    )
    return ModelConfig(**{**base, **kw})


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D)).astype(np.float32)
    experts = np.stack([rng.choice(E, K, replace=False) for _ in range(N)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
    return x, experts, weights


def _token_mask(seed=0):
    """[N] 1 = real token; about a quarter padding, some of it before real tokens of a shard."""
    mask = (np.random.default_rng(seed + 100).random(N) > 0.25).astype(np.int32)
    mask[:3] = 0
    return mask


def _naive(x, experts, weights, w_gate, w_up, w_down, token_mask, factor, shards, ep):
    """Per token shard, assignments in (token, choice) order: the r-th one of a real token bound
    for expert e is kept iff r < C = ceil(factor n K / E); padding tokens take no place and get
    no output.  Returns (y, dropped real assignments, kept rows sent to another expert device)."""
    n_local, per_device = N // shards, E // ep
    capacity = math.ceil(factor * n_local * K / E)
    y = np.zeros((N, D))
    dropped = remote = 0
    for shard in range(shards):
        taken = np.zeros(E, int)
        for t in range(shard * n_local, (shard + 1) * n_local):
            for c in range(K):
                e = experts[t, c]
                if not token_mask[t]:
                    continue
                if taken[e] >= capacity:
                    dropped += 1
                    continue
                taken[e] += 1
                remote += e // per_device != shard % ep
                h = x[t] @ w_gate[e]
                h = h / (1 + np.exp(-h)) * (x[t] @ w_up[e])
                y[t] += weights[t, c] * (h @ w_down[e])
    return y, dropped, remote


LAYOUTS = {"data2_expert4": dict(data=2, expert=4), "data2_expert2_tensor2": dict(data=2, expert=2, tensor=2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("factor", [0.5, 1.0, 4.0])
def test_expert_parallel_capacity_matches_naive_drops_and_bytes(factor, layout):
    # fp32 vs float64, rtol 1e-4 / atol 1e-5; dropped and bytes exact (counted once, not once
    # per replica: with tensor 2 every token shard lives on two devices)
    axes = LAYOUTS[layout]
    shards, ep = axes["data"] * axes["expert"], axes["expert"]
    cfg = _cfg()
    mesh = build_mesh(MeshConfig(**axes))
    layer = RoutedExperts(
        cfg,
        policy=get_policy("fp32"),
        impl=ImplConfig(moe_dispatch="capacity", moe_capacity_factor=factor),
        experts=ExpertParallel(mesh, DEFAULT_RULES),
        rngs=nnx.Rngs(0),
    )
    x, experts, weights = _inputs()
    mask = _token_mask()
    with use_sharding(mesh):
        y, dropped, sent = jax.jit(lambda layer, *a: layer(a[0], Routing(a[2], a[1], None), a[3]))(
            layer, x, experts, weights, mask
        )
    w = [np.asarray(v[...], np.float64) for v in (layer.w_gate, layer.w_up, layer.w_down)]
    y_ref, dropped_ref, remote = _naive(x, experts, weights, *w, mask, factor, shards, ep)
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
    assert int(dropped) == dropped_ref
    assert float(sent) == 2 * remote * D * 4  # both directions, fp32 rows
    assert (dropped_ref == 0) == (factor >= 4.0)


def test_capacity_factor_drops_per_shard_as_the_local_dispatch_does():
    """The capacity factor means the same with and without expert parallelism: each device's
    shard drops exactly what the local dispatch drops when given that shard alone."""
    cfg, impl = _cfg(), ImplConfig(moe_dispatch="capacity", moe_capacity_factor=0.75)
    mesh = build_mesh(MeshConfig(data=2, expert=EP))
    local = RoutedExperts(cfg, policy=get_policy("fp32"), impl=impl, rngs=nnx.Rngs(5))
    ep_layer = RoutedExperts(
        cfg,
        policy=get_policy("fp32"),
        impl=impl,
        experts=ExpertParallel(mesh, DEFAULT_RULES),
        rngs=nnx.Rngs(5),
    )
    x, experts, weights = _inputs(5)
    mask = _token_mask(5)
    with use_sharding(mesh):
        y, dropped, _ = jax.jit(lambda layer, *a: layer(a[0], Routing(a[2], a[1], None), a[3]))(
            ep_layer, x, experts, weights, mask
        )
    n = N // SHARDS
    parts = [
        local(
            jnp.asarray(x[i : i + n]),
            Routing(jnp.asarray(weights[i : i + n]), jnp.asarray(experts[i : i + n]), None),
            jnp.asarray(mask[i : i + n]),
        )
        for i in range(0, N, n)
    ]
    np.testing.assert_allclose(y, np.concatenate([p.y for p in parts]), rtol=1e-5, atol=1e-6)
    assert int(dropped) == sum(int(p.dropped) for p in parts) > 0


@pytest.mark.parametrize(
    "model, kernel",
    [(dict(), dict()), (dict(moe_ffn_dim=16), dict(gmm="pallas"))],
    ids=["ragged_dot", "pallas"],
)
def test_expert_parallel_dropless_equals_local_dispatch(model, kernel):
    cfg, impl = _cfg(**model), ImplConfig(**kernel)
    mesh = build_mesh(MeshConfig(data=2, expert=EP))
    layer = RoutedExperts(cfg, policy=get_policy("fp32"), impl=impl, rngs=nnx.Rngs(1))
    ep_layer = RoutedExperts(
        cfg,
        policy=get_policy("fp32"),
        impl=impl,
        experts=ExpertParallel(mesh, DEFAULT_RULES),
        rngs=nnx.Rngs(1),
    )
    np.testing.assert_array_equal(ep_layer.w_down[...], layer.w_down[...])  # same seed, same experts
    x, experts, weights = _inputs(1)
    routing = Routing(jnp.asarray(weights), jnp.asarray(experts), None)
    y_local, dropped_local, sent_local = layer(jnp.asarray(x), routing)
    with use_sharding(mesh):
        y, dropped, sent = jax.jit(lambda layer, x, r: layer(x, r))(ep_layer, x, routing)
    np.testing.assert_allclose(y, y_local, rtol=1e-5, atol=1e-6)
    assert int(dropped) == int(dropped_local) == 0
    assert float(sent_local) == 0 and float(sent) > 0


def test_group_limited_routing_bounds_groups_per_token():
    """Node-limited routing: with 4 groups (one per expert device) and topk_group 2, no token
    reaches more than 2 groups, so no token's assignments go to more than 2 devices."""
    cfg = _cfg()
    mesh = build_mesh(MeshConfig(data=2, expert=EP))
    moe = MoE(cfg, policy=get_policy("fp32"), experts=ExpertParallel(mesh, DEFAULT_RULES), rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(0), (4, 16, D))
    with use_sharding(mesh):
        _, stats = jax.jit(lambda m, x: m(x, jnp.ones(x.shape[:2], jnp.int32)))(moe, x)
    routing = moe.router(x.reshape(-1, D))
    devices_per_token = [len(set(np.asarray(r) // (E // EP))) for r in routing.experts]
    assert max(devices_per_token) <= cfg.topk_group
    assert 1.0 <= float(stats.groups_per_token) <= cfg.topk_group
    np.testing.assert_allclose(float(stats.groups_per_token), np.mean(devices_per_token), rtol=1e-6)


def test_overlap_chunks_give_identical_results_and_split_the_all_to_alls():
    """ep_overlap_chunks=2 runs two independent dispatch/compute/combine pipelines per device:
    same output, twice the all-to-all ops in the compiled program."""
    x, experts, weights = _inputs(3)
    routing = Routing(jnp.asarray(weights), jnp.asarray(experts), None)
    outputs, counts = [], []
    mesh = build_mesh(MeshConfig(data=2, expert=EP))
    for chunks in (1, 2):
        layer = RoutedExperts(
            _cfg(),
            policy=get_policy("fp32"),
            impl=ImplConfig(ep_overlap_chunks=chunks),
            experts=ExpertParallel(mesh, DEFAULT_RULES),
            rngs=nnx.Rngs(4),
        )
        with use_sharding(mesh):
            fn = jax.jit(lambda layer, x, r: layer(x, r))
            outputs.append(fn(layer, x, routing)[0])
            counts.append(fn.lower(layer, x, routing).compile().as_text().count("all-to-all("))
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-6, atol=1e-7)
    assert counts[1] == 2 * counts[0] > 0
