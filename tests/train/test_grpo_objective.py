"""The GRPO objective (train/objectives/grpo.py) and its advantages (posttrain/advantages.py).

- advantages for each scale_rewards against a naive float64 loop over groups (None rewards left
  out of the statistics, all-equal groups 0), the over-length penalty and the training mask;
- every loss_agg (grpo, dapo, dr_grpo, gspo) with KL and truncated importance sampling against a
  float64 numpy computation on fixed log-probabilities, advantages and ragged masks, with the clip
  active on both sides;
- k3 and its gradient d k3 / d logp = 1 - exp(ref - logp);
- on the tiny model, with routing replay of random experts: with logp_old from the rollout's own
  forward (one pass per batch) the ratio is 1 and the gradient is the plain policy gradient
  -(1/N) sum_i (1/|y_i|) sum_t A_i grad logp_t; the log-probabilities at T equal log_softmax(z / T)
  of the full logits (float64);
- one train step of the objective with routing replay on 8 devices (expert 2 x data 4; pipeline
  stage 2 x data 4) equals the step on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.posttrain.advantages import (
    ScaleRewards,
    as_array,
    group_advantages,
    overlong_penalty,
    spread_groups,
    trains,
)
from frontier_jax.train.objectives.grpo import (
    GRPO,
    GRPOBatch,
    GRPOLossConfig,
    LossAgg,
    aggregate,
    k3,
    token_losses,
)

from .common import tiny_config

G = 3
REWARDS = [1.0, 0.0, None, 2.0, 2.0, 2.0, 0.5, None, None, 3.0, -1.0, 0.0]  # 4 groups of 3


def _naive_advantages(rewards, scale, eps=1e-4):
    out = []
    scored_all = [r for r in rewards if r is not None]
    batch_std = float(np.std(np.array(scored_all, np.float64)))
    for g in range(0, len(rewards), G):
        group = rewards[g : g + G]
        scored = [r for r in group if r is not None]
        mean = sum(scored) / len(scored) if scored else 0.0
        std = float(np.sqrt(sum((r - mean) ** 2 for r in scored) / len(scored))) if scored else 0.0
        flat = len(scored) < 2 or max(scored) == min(scored)
        for r in group:
            if r is None or flat:
                out.append(0.0)
            elif scale == "group":
                out.append((r - mean) / (std + eps))
            elif scale == "batch":
                out.append((r - mean) / (batch_std + eps))
            else:
                out.append(r - mean)
    return np.array(out)


@pytest.mark.parametrize("scale", list(ScaleRewards))
def test_group_advantages_match_a_naive_loop(scale):
    got = group_advantages(as_array(REWARDS), G, scale)
    np.testing.assert_allclose(got, _naive_advantages(REWARDS, str(scale)), rtol=1e-6, atol=1e-7)
    assert spread_groups(as_array(REWARDS), G).tolist() == [True, False, False, True]


def test_overlong_penalty_and_training_mask():
    pen = overlong_penalty(np.array([4, 6, 7, 8]), max_tokens=8, buffer=4, penalty=1.0)
    np.testing.assert_allclose(pen, [0.0, -0.5, -0.75, -1.0])
    assert not overlong_penalty(np.array([8]), 8, 0, 1.0).any()
    rewards = as_array([1.0, None, 0.0])
    assert trains(rewards, np.array([False, False, True]), True).tolist() == [True, False, False]
    assert trains(rewards, np.array([False, False, True]), False).tolist() == [True, False, True]


# ---------------------------------------------------------------------------- the loss, numpy
B, T = 6, 7


def _fixed_batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = np.zeros((B, T))
    for i, (start, length) in enumerate([(2, 5), (3, 2), (1, 6), (4, 3), (2, 1), (3, 0)]):
        mask[i, start : start + length] = 1  # ragged; the last row trains nothing
    logp = -rng.uniform(0.1, 3.0, (B, T))
    shift = np.array([-0.5, 0.5, -0.5, 0.5, 0.0, 0.0])[:, None]  # r < 0.8 where A < 0, r > 1.28 where A > 0
    old = logp + shift + rng.normal(0, 0.2, (B, T))
    sampler = old + rng.normal(0, 0.3, (B, T))
    ref = logp + rng.normal(0, 0.5, (B, T))
    adv = np.repeat(group_advantages(as_array([1.0, 0.0, 2.0, 0.5, None, 3.0]), G, ScaleRewards.group), T)
    adv = adv.reshape(B, T).astype(np.float64)
    return dict(
        logp=logp,
        old_logprobs=old,
        sampler_logprobs=sampler,
        ref_logprobs=ref,
        advantages=adv,
        completion_mask=mask,
    )


def _numpy_loss(b, loss: GRPOLossConfig, rows_in_use: int):
    logp, old, adv, m = b["logp"], b["old_logprobs"], b["advantages"], b["completion_mask"]
    lengths = m.sum(1)
    if loss.loss_agg == "gspo":
        seq = np.exp(((logp - old) * m).sum(1) / np.maximum(lengths, 1))
        ratio = np.repeat(seq[:, None], T, 1)
    else:
        ratio = np.exp(logp - old)
    clipped = np.clip(ratio, 1 - loss.eps_low, 1 + loss.eps_high)
    surrogate = np.minimum(ratio * adv, clipped * adv)
    if loss.tis_cap:
        surrogate = surrogate * np.minimum(np.exp(old - b["sampler_logprobs"]), loss.tis_cap)
    delta = b["ref_logprobs"] - logp
    kl = np.exp(delta) - delta - 1
    per = -surrogate + loss.beta * kl
    if loss.loss_agg in ("grpo", "gspo"):
        rows = lengths > 0
        value = ((per * m).sum(1)[rows] / lengths[rows]).sum() / rows.sum()
    elif loss.loss_agg == "dapo":
        value = (per * m).sum() / m.sum()
    else:
        value = (per * m).sum() / (rows_in_use * loss.max_completion_tokens)
    low = ((ratio < 1 - loss.eps_low) & (adv < 0) & (m > 0)).sum()
    high = ((ratio > 1 + loss.eps_high) & (adv > 0) & (m > 0)).sum()
    return value, low, high, (kl * m).sum()


@pytest.mark.parametrize("agg", list(LossAgg))
@pytest.mark.parametrize("beta, tis_cap", [(0.0, 0.0), (0.05, 2.0)])
def test_loss_variants_match_float64_numpy(agg, beta, tis_cap):
    jax.config.update("jax_enable_x64", True)
    try:
        loss = GRPOLossConfig(
            group_size=G,
            loss_agg=agg,
            eps_low=0.2,
            eps_high=0.28,
            beta=beta,
            tis_cap=tis_cap,
            max_completion_tokens=8,
        )
        b = _fixed_batch()
        zeros = jnp.zeros((B, T), jnp.int32)
        batch = GRPOBatch(
            zeros, zeros, zeros, zeros, **{k: jnp.asarray(v) for k, v in b.items() if k != "logp"}
        )
        mask = batch.completion_mask
        norm = {
            "tokens": mask.sum(),
            "sequences": (mask.sum(-1) > 0).sum().astype(jnp.float64),
            "rows": jnp.float64(B),
        }
        per, figures = token_losses(jnp.asarray(b["logp"]), batch, loss)
        got = aggregate(per, mask, loss, norm)
        want, low, high, kl_sum = _numpy_loss(b, loss, B)
        np.testing.assert_allclose(float(got), want, rtol=1e-12)
        assert low > 0 and high > 0  # the clip is active on both sides
        assert float((figures["clip_low"] * mask).sum()) == low
        assert float((figures["clip_high"] * mask).sum()) == high
        if beta:
            np.testing.assert_allclose(float((figures["kl"] * mask).sum()), kl_sum, rtol=1e-12)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_k3_and_its_gradient():
    ref = np.array([-1.0, -0.5, -2.0, -0.1])
    logp = np.array([-1.2, -0.5, -0.3, -3.0])
    got = k3(jnp.asarray(ref, jnp.float32), jnp.asarray(logp, jnp.float32))
    want = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    assert (np.asarray(got) >= 0).all() and got[1] == 0
    grad = jax.grad(lambda lp: k3(jnp.asarray(ref, jnp.float32), lp).sum())(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad), 1 - np.exp(ref - logp), rtol=1e-5)


# ---------------------------------------------------------------------------- on the tiny model
SEQ = 16


def _rollout_batch(rows=8, seed=0):
    """Rows of a prompt (4 tokens) + a completion of ragged length; per-row advantages."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 260, (rows, SEQ)).astype(np.int32)
    lengths = rng.integers(6, SEQ + 1, rows)
    segment = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], 1)
    completion = ((np.arange(SEQ)[None] >= 3) & (np.arange(SEQ)[None] < lengths[:, None] - 1)).astype(
        np.float32
    )
    adv = np.repeat(rng.normal(0, 1, (rows, 1)).astype(np.float32), SEQ, 1)
    return {
        "input_ids": ids * segment,
        "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (rows, SEQ)).copy(),
        "segment_ids": segment,
        "targets": targets * segment,
        "completion_mask": completion,
        "advantages": adv,
    }


def _replayed_experts(model_cfg, rows=8, seed=2) -> np.ndarray:
    """routed_experts [rows, SEQ, L_moe, k]: k distinct random experts per token and layer (not the
    router's own choice, so a forward that ignored them would compute something else)."""
    rng = np.random.default_rng(seed)
    shape = (rows, SEQ, model_cfg.num_moe_layers, model_cfg.n_routed_experts)
    return np.argsort(rng.random(shape), -1)[..., : model_cfg.num_experts_per_tok].astype(np.int32)


def test_one_pass_per_batch_gives_ratio_one_and_the_plain_policy_gradient():
    """With routing replay: logp_old and the objective's forward run on the batch's experts (random
    ones, not the router's choice: the ratio is 1 only if both read them; routed log-probs differ).
    (The routed forward's ratio 1 is checked by the GRPO run of tests/posttrain/test_grpo.py.)"""
    from frontier_jax.runtime.logprobs import logprob_step, sequence_logprobs
    from frontier_jax.runtime.program import build_model_program

    cfg = tiny_config(f"train.seq_len={SEQ}")
    program = build_model_program(cfg, jax.devices()[:1])
    params, biases = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())(1)
    loss = GRPOLossConfig(group_size=2, temperature=0.7, routing_replay=True)
    objective = GRPO(loss, cfg.model)
    host = {**_rollout_batch(), "routed_experts": _replayed_experts(cfg.model)}
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    old, _ = logprob_step(program, temperature=0.7)(params, biases, batch)  # the rollout's forward
    batch["old_logprobs"] = old
    routed, _ = logprob_step(program, temperature=0.7)(
        params, biases, {k: v for k, v in batch.items() if k != "routed_experts"}
    )
    assert float(jnp.abs(routed - old).max()) > 1e-3  # the replayed experts change the forward

    def grpo_loss(p):
        mb = objective.prepare(batch, {})
        value, metrics, _ = objective(program.model(p, biases), mb, objective.normalisers(mb, 1))
        return value, metrics

    def policy_gradient_loss(p):
        logp, _ = sequence_logprobs(program.model(p, biases), batch, temperature=0.7)
        m = batch["completion_mask"]
        per_row = (batch["advantages"] * logp * m).sum(-1) / jnp.maximum(m.sum(-1), 1)
        return -per_row.sum() / (m.sum(-1) > 0).sum()

    (got, metrics), grads = jax.jit(jax.value_and_grad(grpo_loss, has_aux=True))(params)
    want_grads = jax.jit(jax.grad(policy_gradient_loss))(params)
    m = host["completion_mask"]
    np.testing.assert_allclose(float(metrics["ratio_sum"]) / m.sum(), 1.0, atol=1e-6)
    assert float(metrics["clip_low_sum"]) == 0 and float(metrics["clip_high_sum"]) == 0
    rows = m.sum(-1) > 0  # ratio 1: the loss is minus the mean advantage of the rows that train
    np.testing.assert_allclose(float(got), -host["advantages"][rows, 0].mean(), rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path)
        )


def test_logprobs_at_a_temperature_equal_the_full_log_softmax():
    from frontier_jax.model.logprobs import chunked_token_stats

    rng = np.random.default_rng(3)
    g = rng.normal(0, 1, (5, 8)).astype(np.float32)
    w = rng.normal(0, 1, (8, 37)).astype(np.float32)
    y = rng.integers(0, 37, 5)
    stats = chunked_token_stats(jnp.asarray(g), jnp.asarray(w), jnp.asarray(y), chunk=8, temperature=0.6)
    z = g.astype(np.float64) @ w.astype(np.float64) / 0.6
    logsm = z - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)) - z.max(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(stats.logprob), logsm[np.arange(5), y], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(stats.entropy), -(np.exp(logsm) * logsm).sum(1), rtol=1e-5, atol=1e-5
    )

    def full(gg, ww):  # the gradient of the chunked form equals that of the full log-softmax
        return jnp.take_along_axis(jax.nn.log_softmax(gg @ ww / 0.6), jnp.asarray(y)[:, None], 1).sum()

    chunked = lambda gg, ww: chunked_token_stats(
        gg, ww, jnp.asarray(y), chunk=8, temperature=0.6
    ).logprob.sum()  # noqa: E731
    for a, b in zip(jax.grad(chunked, (0, 1))(g, w), jax.grad(full, (0, 1))(g, w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(("mesh.expert=2", "mesh.data=4"), id="expert2_x_data4"),
        pytest.param(
            ("mesh.stage=2", "mesh.data=4", "train.pipeline.schedule=1f1b", "train.micro_batches=2"),
            id="pipeline_stage2_x_data4",
            marks=pytest.mark.slow,  # (a minute of compiling on a loaded CI core)
        ),
    ],
)
def test_a_step_on_eight_devices_equals_one_device(layout):
    """Expert parallelism, and pipeline stages (the objective cut into its staged terms), with
    routing replay (the batch's experts reach every stage's layers)."""
    from frontier_jax.train.loop import build_runner

    loss = GRPOLossConfig(group_size=2, beta=0.1, loss_agg=LossAgg.dapo, eps_high=0.28, routing_replay=True)
    host = _rollout_batch()
    rng = np.random.default_rng(1)
    host["old_logprobs"] = -rng.uniform(3, 7, (8, SEQ)).astype(np.float32)
    host["ref_logprobs"] = -rng.uniform(3, 7, (8, SEQ)).astype(np.float32)
    host["routed_experts"] = _replayed_experts(tiny_config().model)
    results = []
    for extra, devices in ((layout, jax.devices()), ((), jax.devices()[:1])):
        cfg = tiny_config(f"train.seq_len={SEQ}", "train.warmup_steps=0", *extra)
        runner = build_runner(cfg, devices, objective=GRPO(loss, cfg.model))
        state = runner.init(0)
        batch = {k: jax.device_put(jnp.asarray(v), runner.batch_sharding) for k, v in host.items()}
        state, metrics = runner.step(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state.params), jax.device_get(state.extra)))
    (m8, p8, e8), (m1, p1, e1) = results
    for key in ("loss", "kl", "entropy", "clip_low", "clip_high", "grad_norm"):
        np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # 1e-5: a third of one AdamW step (lr 3e-3)
    assert jax.tree.structure(e8) == jax.tree.structure({"reference": p1})  # the reference is kept


def test_the_reference_is_a_copy_reset_to_the_policy_every_n_steps():
    cfg = tiny_config()
    params = {"w": jnp.arange(3.0)}
    objective = GRPO(GRPOLossConfig(beta=0.1, ref_reset_every=2), cfg.model)
    extra = objective.init_extra(params, {})
    moved = {"w": params["w"] + 1}
    kept = objective.next_extra(extra, moved, jnp.int32(1))
    np.testing.assert_array_equal(kept["reference"]["w"], params["w"])
    np.testing.assert_array_equal(
        objective.next_extra(kept, moved, jnp.int32(2))["reference"]["w"], moved["w"]
    )
    assert GRPO(GRPOLossConfig(), cfg.model).init_extra(params, {}) == {}  # beta 0: no reference kept


def test_config_errors():
    with pytest.raises(ValueError, match="grpo.group_size=1 must be >= 2"):
        GRPOLossConfig(group_size=1).validate()
    with pytest.raises(ValueError, match="grpo.ref_reset_every needs a reference"):
        GRPOLossConfig(ref_reset_every=5).validate()
