"""AdamW with global-norm clipping, learning-rate schedules and protected moment dtypes.

AdamW (Loshchilov & Hutter): m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
    w <- w - lr_t (m_hat / (sqrt(v_hat) + eps) + wd * w)
with weight decay applied to matrices only (projections, experts, embeddings, router; not
norm scales), as given by a boolean mask tree.  Gradients are clipped to global norm `grad_clip` first.
Moments are stored in `moment_dtype` (fp32 or bf16) and updated in fp32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from frontier_jax.train.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr(step): `train.schedule`'s (`base_schedule`), except in the context stages that set
    an `lr` (`train.stages`), which train at that constant rate (V3's 32K / 128K extension
    stages: 7.3e-6, the final pre-training rate)."""
    base = base_schedule(cfg)
    constant, start = [], 0
    for stage in cfg.stages:
        if stage.lr is not None:
            constant.append((start, stage.until_step, stage.lr))
        start = stage.until_step
    if not constant:
        return base

    def schedule(step):
        lr = base(step)
        for first, until, value in constant:
            lr = jnp.where((step >= first) & (step < until), value, lr)
        return lr

    return schedule


def base_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr(step): linear warmup to `lr`, then
    "constant": flat;  "cosine": cosine to lr_min at `steps`;
    "deepseek": flat until decay_start, cosine to lr_min over decay_steps, then flat lr_min."""
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
        return optax.join_schedules([warmup, after], [cfg.warmup_steps])
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(
            cfg.lr, max(cfg.steps - cfg.warmup_steps, 1), alpha=cfg.lr_min / cfg.lr
        )
        return optax.join_schedules([warmup, decay], [cfg.warmup_steps])
    hold = optax.constant_schedule(cfg.lr)
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.decay_steps, 1), alpha=cfg.lr_min / cfg.lr)
    tail = optax.constant_schedule(cfg.lr_min)
    decay_start = max(cfg.decay_start, cfg.warmup_steps)
    return optax.join_schedules(
        [warmup, hold, decay, tail], [cfg.warmup_steps, decay_start, decay_start + cfg.decay_steps]
    )


def batch_size_at(cfg: TrainConfig, step: int) -> int:
    """Batch-size ramp: rows read at `step` (host side, by the data iterator), linear from
    batch_ramp_start to global_batch over batch_ramp_steps (rounded down to a multiple of
    micro_batches, at least micro_batches)."""
    if not cfg.batch_ramp_steps:
        return cfg.global_batch
    frac = min(max(int(step) / cfg.batch_ramp_steps, 0.0), 1.0)
    rows = math.floor(cfg.batch_ramp_start + frac * (cfg.global_batch - cfg.batch_ramp_start))
    rows = rows // cfg.micro_batches * cfg.micro_batches
    return min(max(rows, cfg.micro_batches), cfg.global_batch)


def with_moment_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """Stores every floating state leaf of `inner` in `dtype`; computes in fp32."""

    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def scale_by_schedule_at_step(schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """updates -> -schedule(t) * updates, with t the `step` passed to `update` (the train state's
    step, which keeps counting through skipped non-finite steps whose optimizer state is rolled
    back), or this transformation's own count when no step is passed."""

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        lr = schedule(state.count if step is None else step)
        return jax.tree.map(lambda u: -lr * u, updates), optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


def build_optimizer(cfg: TrainConfig, decay_mask) -> optax.GradientTransformation:
    """decay_mask: pytree of bools matching the parameters (True = apply weight decay)."""
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    if cfg.moment_dtype != "float32":
        adam = with_moment_dtype(adam, jnp.dtype(cfg.moment_dtype))
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        adam,
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        scale_by_schedule_at_step(learning_rate_schedule(cfg)),
    )
