"""Learning-rate schedules, the batch-size ramp and AdamW (frontier_jax/train/optimizer.py)
against closed forms and a float64 numpy AdamW.

Tolerances: schedule values rtol 1e-6 (fp32 evaluation of the closed forms); AdamW params
after 3 steps rtol 1e-5 / atol 1e-7 vs float64 (fp32 arithmetic on O(1) values); bf16 moments:
updates within 2% of the fp32-moment updates (bf16 keeps 8 significant bits: 0.4% relative
per stored moment, compounded over a few steps).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from frontier_jax.config import TrainConfig
from frontier_jax.train.optimizer import batch_size_at, build_optimizer, learning_rate_schedule

from .common import tiny_config


def _lr(cfg: TrainConfig, step: int) -> float:
    return float(learning_rate_schedule(cfg)(step))


def _cos(lr, lr_min, frac):
    return lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * frac))


# ---------------------------------------------------------------------- schedules
def test_constant_schedule_warmup_then_flat():
    cfg = TrainConfig(schedule="constant", lr=2e-3, lr_min=0.0, warmup_steps=10, steps=100).validate()
    expected = {0: 0.0, 1: 2e-4, 5: 1e-3, 9: 1.8e-3, 10: 2e-3, 50: 2e-3, 100: 2e-3, 10_000: 2e-3}
    for step, value in expected.items():
        assert _lr(cfg, step) == pytest.approx(value, rel=1e-6, abs=1e-12), step


def test_cosine_schedule_key_steps():
    lr, lr_min, w, s = 3e-3, 3e-4, 20, 220
    cfg = TrainConfig(schedule="cosine", lr=lr, lr_min=lr_min, warmup_steps=w, steps=s).validate()
    expected = {
        0: 0.0,
        10: lr / 2,  # mid-warmup
        w: lr,  # warmup end = peak
        w + 50: _cos(lr, lr_min, 50 / 200),
        w + 100: (lr + lr_min) / 2,  # mid-cosine
        w + 150: _cos(lr, lr_min, 150 / 200),
        s: lr_min,  # end of training
        s + 100: lr_min,  # past the end: stays at lr_min
    }
    for step, value in expected.items():
        assert _lr(cfg, step) == pytest.approx(value, rel=1e-6, abs=1e-12), step


def test_deepseek_schedule_warmup_hold_cosine_tail():
    lr, lr_min = 2.2e-4, 2.2e-5
    cfg = TrainConfig(
        schedule="deepseek",
        lr=lr,
        lr_min=lr_min,
        warmup_steps=20,
        decay_start=100,
        decay_steps=400,
        steps=10_000,
    ).validate()
    expected = {
        0: 0.0,
        5: lr / 4,
        20: lr,  # warmup end
        60: lr,  # hold
        100: lr,  # decay starts
        200: _cos(lr, lr_min, 100 / 400),
        300: (lr + lr_min) / 2,  # mid-cosine
        499: _cos(lr, lr_min, 399 / 400),
        500: lr_min,  # after decay: lr_min ...
        5_000: lr_min,  # ... forever, independent of train.steps
    }
    for step, value in expected.items():
        assert _lr(cfg, step) == pytest.approx(value, rel=1e-6, abs=1e-12), step
    # train.steps does not enter the "deepseek" schedule
    longer = TrainConfig(**{**cfg.__dict__, "steps": 50}).validate()
    for step in (0, 7, 20, 150, 300, 600):
        assert _lr(longer, step) == _lr(cfg, step)


def test_deepseek_schedule_decay_start_before_warmup_end_starts_decay_at_warmup_end():
    cfg = TrainConfig(
        schedule="deepseek", lr=1e-3, lr_min=1e-4, warmup_steps=10, decay_start=0, decay_steps=20
    ).validate()
    assert _lr(cfg, 10) == pytest.approx(1e-3, rel=1e-6)
    assert _lr(cfg, 20) == pytest.approx(_cos(1e-3, 1e-4, 0.5), rel=1e-6)
    assert _lr(cfg, 30) == pytest.approx(1e-4, rel=1e-6)


def test_deepseek_schedule_without_decay_steps_is_rejected_naming_the_field():
    """decay_steps=0 would make the cosine a single step from lr to lr_min right at decay_start."""
    with pytest.raises(ValueError, match=r"train.decay_steps=0 with train.schedule='deepseek'"):
        TrainConfig(schedule="deepseek", warmup_steps=10, decay_start=0, decay_steps=0).validate()
    TrainConfig(schedule="deepseek", warmup_steps=10, decay_start=0, decay_steps=1).validate()
    TrainConfig(schedule="cosine", decay_steps=0).validate()


def test_no_warmup_starts_at_peak():
    for schedule in ("constant", "cosine", "deepseek"):
        cfg = TrainConfig(
            schedule=schedule, lr=1e-3, lr_min=1e-4, warmup_steps=0, steps=100, decay_start=50, decay_steps=10
        ).validate()
        assert _lr(cfg, 0) == pytest.approx(1e-3, rel=1e-6), schedule


# --------------------------------------------------------------------- batch ramp
def test_batch_size_ramp():
    cfg = TrainConfig(global_batch=64, micro_batches=4, batch_ramp_steps=100, batch_ramp_start=8).validate()
    # rows = floor(8 + min(step/100, 1) * 56) rounded down to a multiple of 4
    expected = {0: 8, 1: 8, 10: 12, 33: 24, 50: 36, 99: 60, 100: 64, 1000: 64}
    for step, rows in expected.items():
        assert batch_size_at(cfg, step) == rows, step
    # never below micro_batches, never above global_batch
    tiny = TrainConfig(global_batch=64, micro_batches=4, batch_ramp_steps=10, batch_ramp_start=1).validate()
    assert batch_size_at(tiny, 0) == 4
    # without a ramp: always the global batch
    flat = TrainConfig(global_batch=64, micro_batches=4).validate()
    for step in (0, 5, 10_000):
        assert batch_size_at(flat, step) == 64
    # monotone over the ramp
    values = [batch_size_at(cfg, s) for s in range(0, 120)]
    assert values == sorted(values)
    assert all(v % 4 == 0 for v in values)


# ------------------------------------------------------------------------- AdamW
PARAM_SHAPES = {"proj": {"kernel": (4, 3)}, "norm": {"scale": (3,)}, "embed": {"embedding": (5, 3)}}
DECAY_MASK = {"proj": {"kernel": True}, "norm": {"scale": False}, "embed": {"embedding": True}}


def _numpy_adamw(params, grads_seq, cfg: TrainConfig):
    """float64 AdamW of the module docstring: clip -> Adam with bias correction -> + wd * w
    where the mask says -> * -lr_t, lr_t the schedule at the 0-based update index."""
    flat_p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
    mask = _flat(DECAY_MASK)
    m = {k: np.zeros_like(v) for k, v in flat_p.items()}
    v2 = {k: np.zeros_like(v) for k, v in flat_p.items()}
    for t, grads in enumerate(grads_seq):
        g = {k: np.asarray(x, np.float64) for k, x in _flat(grads).items()}
        norm = math.sqrt(sum((x**2).sum() for x in g.values()))
        if norm > cfg.grad_clip:
            g = {k: x * cfg.grad_clip / norm for k, x in g.items()}
        lr_t = cfg.lr * min(t / cfg.warmup_steps, 1.0) if cfg.warmup_steps else cfg.lr
        for k in flat_p:
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
            v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
            m_hat = m[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = v2[k] / (1 - cfg.b2 ** (t + 1))
            update = m_hat / (np.sqrt(v_hat) + cfg.eps)
            if mask[k]:
                update = update + cfg.weight_decay * flat_p[k]
            flat_p[k] = flat_p[k] - lr_t * update
    return flat_p


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _random_tree(rng, scale):
    return jax.tree.map(
        lambda shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32),
        PARAM_SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _run_optimizer(cfg, params, grads_seq):
    opt = build_optimizer(cfg, DECAY_MASK)

    @jax.jit  # one compile instead of many eager ops
    def run(params, grads_seq):
        state = opt.init(params)
        for grads in grads_seq:
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return params, state

    return run(params, grads_seq)


def test_adamw_matches_numpy_reference():
    cfg = TrainConfig(
        schedule="constant",
        lr=1e-2,
        lr_min=0.0,
        warmup_steps=2,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        grad_clip=1.0,
    ).validate()
    rng = np.random.default_rng(0)
    params = _random_tree(rng, 1.0)
    # step 0: norm ~ 0.2 (not clipped); step 1: norm ~ 20 (clipped); step 2: mixed
    grads_seq = [_random_tree(rng, 0.05), _random_tree(rng, 5.0), _random_tree(rng, 0.3)]
    got, _ = _run_optimizer(cfg, params, grads_seq)
    assert optax.global_norm(grads_seq[0]) < 1 < optax.global_norm(grads_seq[1])
    ref = _numpy_adamw(params, grads_seq, cfg)
    for k, value in _flat(got).items():
        np.testing.assert_allclose(np.asarray(value), ref[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # the first update has lr = 0 (warmup from 0), so it must not move anything
    after_one, _ = _run_optimizer(cfg, params, grads_seq[:1])
    for k, value in _flat(after_one).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_flat(params)[k]), err_msg=k)


def test_weight_decay_only_where_the_mask_says():
    cfg = TrainConfig(schedule="constant", lr=1e-1, lr_min=0.0, warmup_steps=0, weight_decay=0.5).validate()
    rng = np.random.default_rng(1)
    params = _random_tree(rng, 1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    got, _ = _run_optimizer(cfg, params, [zeros])  # zero gradient: only decay moves weights
    for k, value in _flat(got).items():
        before = np.asarray(_flat(params)[k])
        if _flat(DECAY_MASK)[k]:
            np.testing.assert_allclose(np.asarray(value), before * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(np.asarray(value), before, err_msg=k)


def test_trainer_decay_mask_excludes_exactly_the_norm_scales():
    """With a zero gradient and lr at its peak from step 0, AdamW moves a weight only through
    weight decay: every leaf of the model must move except the RMSNorm scales."""
    from flax import nnx

    from frontier_jax.train.step import Trainer

    trainer = Trainer(tiny_config("train.warmup_steps=0"))
    shapes = nnx.to_pure_dict(trainer.abstract_params)
    opt = trainer.optimizer

    @jax.jit
    def decay_only(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return opt.update(zeros, opt.init(params), params)[0]

    updates = decay_only(jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes))
    norm_leaves = 0
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        is_norm = "norm" in name and name.endswith("['scale']")
        norm_leaves += is_norm
        assert bool(np.all(np.asarray(update) != 0)) == (not is_norm), name
        assert bool(np.any(np.asarray(update) != 0)) == (not is_norm), name
    assert norm_leaves >= 8  # attn/ffn/q/kv norms, final norm, MTP norms


def test_bf16_moments_are_stored_in_bf16_and_track_fp32():
    base = dict(schedule="constant", lr=1e-2, lr_min=0.0, warmup_steps=0, weight_decay=0.1)
    cfg32 = TrainConfig(**base, moment_dtype="float32").validate()
    cfg16 = TrainConfig(**base, moment_dtype="bfloat16").validate()
    rng = np.random.default_rng(3)
    params = _random_tree(rng, 1.0)
    grads_seq = [_random_tree(rng, 0.1) for _ in range(5)]

    state16 = build_optimizer(cfg16, DECAY_MASK).init(params)
    floats = [x for x in jax.tree.leaves(state16) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert len(floats) == 2 * len(jax.tree.leaves(params))  # mu and nu
    assert all(x.dtype == jnp.bfloat16 for x in floats)

    p32, s32 = _run_optimizer(cfg32, params, grads_seq)
    p16, s16 = _run_optimizer(cfg16, params, grads_seq)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.floating))
    # the integer step counters are kept exactly
    ints32 = [int(x) for x in jax.tree.leaves(s32) if jnp.issubdtype(x.dtype, jnp.integer)]
    ints16 = [int(x) for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert ints32 == ints16 and ints16 and all(i == 5 for i in ints16)
    for k in _flat(params):
        delta32 = np.asarray(_flat(p32)[k]) - np.asarray(_flat(params)[k])
        delta16 = np.asarray(_flat(p16)[k]) - np.asarray(_flat(params)[k])
        np.testing.assert_allclose(delta16, delta32, rtol=2e-2, atol=2e-2 * np.abs(delta32).max(), err_msg=k)
    # the stored moments are the fp32 moments to bf16 precision
    for a, b in zip(jax.tree.leaves(s16), jax.tree.leaves(s32)):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(
                np.asarray(a.astype(jnp.float32)),
                np.asarray(b),
                rtol=2e-2,
                atol=1e-2 * float(jnp.abs(b).max()),
            )


def test_trainer_state_holds_bf16_moments_when_configured():
    from frontier_jax.train.step import Trainer

    trainer = Trainer(tiny_config("train.moment_dtype=bfloat16"))
    shapes = jax.eval_shape(lambda: trainer.init(0))
    floats = [x for x in jax.tree.leaves(shapes.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes.params))  # master weights fp32
