"""The update tail shared by every objective and gradient strategy.

    grads -> optax chain (global-norm clip, AdamW, schedule; `optimizer.py`) -> params
    biases: b <- b + gamma * sign(mean_j load_j - load_i), per MoE layer (V3 report Sec. 2.1.2)
A step whose loss or gradient norm is not finite leaves params, biases, optimizer state and rng
unchanged (`finite` = 0); the step counter advances either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from frontier_jax.train.state import TrainState


def bias_update(biases: dict, loads: dict, gamma: float) -> dict:
    """b <- b + gamma * sign(mean(load) - load), per layer (rows of [L, N_r])."""

    def update(b, load):
        return b + gamma * jnp.sign(load.mean(-1, keepdims=True) - load)

    return jax.tree.map(update, biases, loads)


def apply_update(
    state: TrainState,
    loss: jax.Array,
    grads: dict,
    loads: dict,
    optimizer: optax.GradientTransformation,
    gamma: float,
) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, global gradient norm before clipping, finite flag)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params, step=state.step)
    updated = state.replace(
        params=optax.apply_updates(state.params, updates),
        biases=bias_update(state.biases, loads, gamma),
        opt_state=opt_state,
    )
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    return kept.replace(step=state.step + 1), grad_norm, finite
