"""route(): selection and gates against a naive per-token loop; bias affects selection only;
group-limited routing never leaves the top groups."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.routing import Router, route

from . import common
from . import reference as ref

N = 64


def _cfg(scoring="sigmoid", n_group=1, topk_group=1, norm=True, experts=16, k=4, scale=2.5):
    return common.tiny_config(
        scoring_func=scoring,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm,
        n_routed_experts=experts,
        num_experts_per_tok=k,
        routed_scaling_factor=scale,
    )


def _logits_bias(seed, experts=16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, experts)) * 2.0, rng.standard_normal(experts) * 0.3


def _route(logits, bias, cfg):
    r = common.fast_jit(route, static_argnums=2)(
        jnp.asarray(logits, jnp.float32), jnp.asarray(bias, jnp.float32), cfg
    )
    return np.asarray(r.weights), np.asarray(r.experts), np.asarray(r.scores)


def _as_map(experts, gates):
    return {int(e): float(g) for e, g in zip(experts, gates)}


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2)])
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_naive_loop(scoring, n_group, topk_group, norm):
    # expert sets equal exactly; gates and scores fp32 vs float64: rtol 1e-5, atol 1e-7
    cfg = _cfg(scoring, n_group, topk_group, norm)
    logits, bias = _logits_bias(10 * n_group + 2 * (scoring == "softmax") + norm)
    weights, experts, scores = _route(logits, bias, cfg)
    assert weights.shape == experts.shape == (N, cfg.num_experts_per_tok)
    assert experts.dtype == np.int32 and weights.dtype == np.float32
    for t in range(N):
        want_e, want_g, want_s = ref.route_token(logits[t], bias, cfg)
        assert sorted(experts[t].tolist()) == sorted(want_e), f"token {t}"
        got, want = _as_map(experts[t], weights[t]), _as_map(want_e, want_g)
        for e in want:
            np.testing.assert_allclose(got[e], want[e], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(scores[t], want_s, rtol=1e-5, atol=1e-7)


def test_route_experts_come_in_descending_biased_score_order():
    cfg = _cfg("sigmoid", 4, 2)
    logits, bias = _logits_bias(7)
    _, experts, scores = _route(logits, bias, cfg)
    biased = np.take_along_axis(scores + bias, experts, axis=-1)
    assert (np.diff(biased, axis=-1) <= 0).all()


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_bias_changes_selection_but_not_gate_values(scoring):
    cfg = _cfg(scoring, 4, 2)
    logits, _ = _logits_bias(11)
    zero = np.zeros(16)
    boosted = zero.copy()
    boosted[13] = 10.0  # expert 13 (group 3) now wins every token's selection
    w0, e0, s0 = _route(logits, zero, cfg)
    w1, e1, s1 = _route(logits, boosted, cfg)
    np.testing.assert_array_equal(s0, s1)  # scores are unbiased
    assert (e1 == 13).any(axis=-1).all()
    assert not (e0 == 13).any(axis=-1).all()  # ...so the selection did change
    # gates are the unbiased scores of the chosen experts, normalised and scaled (rtol 1e-6)
    for w, e, s in [(w0, e0, s0), (w1, e1, s1)]:
        chosen = np.take_along_axis(s.astype(np.float64), e, axis=-1)
        np.testing.assert_allclose(w, chosen / chosen.sum(-1, keepdims=True) * 2.5, rtol=1e-6)
    # tokens whose selection is unchanged keep exactly the same gates
    same = (np.sort(e0, -1) == np.sort(e1, -1)).all(-1)
    for t in np.nonzero(same)[0]:
        assert _as_map(e0[t], w0[t]) == pytest.approx(_as_map(e1[t], w1[t]), rel=1e-6)


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("n_group,topk_group,k", [(4, 2, 4), (4, 1, 3), (8, 3, 6)])
def test_group_limit_experts_span_at_most_topk_group_groups(scoring, n_group, topk_group, k):
    cfg = _cfg(scoring, n_group, topk_group, k=k)
    per_group = 16 // n_group
    for seed in range(3):
        logits, bias = _logits_bias(100 + seed)
        _, experts, _ = _route(logits, bias * 5, cfg)  # strong biases spread the choices around
        groups = experts // per_group
        assert max(len(set(g.tolist())) for g in groups) <= topk_group
        assert all(len(set(e.tolist())) == k for e in experts)  # K distinct experts


def test_group_limit_can_exclude_the_best_single_expert():
    # sigmoid group score = sum of the group's top-2 biased scores: a group with one excellent and
    # one poor expert loses against a group with two good ones (topk_group = 1)
    cfg = _cfg("sigmoid", 4, 1, k=2)
    logit = np.full(16, -6.0)
    logit[0], logit[1] = 6.0, -6.0  # group 0: 0.998 + 0.0025 -> 1.0
    logit[4], logit[5] = 1.0, 1.0  # group 1: 0.731 + 0.731 -> 1.46
    _, experts, _ = _route(logit[None].repeat(N, 0), np.zeros(16), cfg)
    assert sorted(experts[0].tolist()) == [4, 5]
    assert ref.route_token(logit, np.zeros(16), cfg)[0] == [4, 5]


def test_router_computes_fp32_logits_from_its_kernel():
    cfg = _cfg("sigmoid", 4, 2)
    router = common.build(lambda: Router(cfg, rngs=nnx.Rngs(0)), seed=3)
    x = np.random.default_rng(5).standard_normal((N, cfg.hidden_size))
    r = common.jit(lambda m, x: m(x))(router, jnp.asarray(x, jnp.bfloat16))
    assert r.scores.dtype == jnp.float32 and r.weights.dtype == jnp.float32
    p = common.params_f64(router)
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)  # the bf16-rounded inputs
    for t in range(0, N, 7):
        want_e, want_g, _ = ref.route_token(xb[t] @ p["kernel"], p["bias"], cfg)
        got = _as_map(np.asarray(r.experts[t]), np.asarray(r.weights[t]))
        assert sorted(got) == sorted(want_e)
        np.testing.assert_allclose([got[e] for e in want_e], want_g, rtol=1e-5)
