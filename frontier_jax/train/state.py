"""The train state: one typed pytree, checkpointed whole (orbax stores its fields by name)."""

from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
    params: dict  # fp32 master weights (pure dict mirroring the NNX module tree)
    biases: dict  # expert-selection biases b [L, N_r] per MoE stack (state, not trained)
    opt_state: Any  # optimizer state (AdamW moments, fp32 or bf16)
    step: jax.Array  # int32: attempted steps (advances through skipped non-finite steps)
    rng: jax.Array  # PRNG key data (for stochastic features; checkpointed for exact resume)
    # the objective's own state (e.g. a reference model's parameters; `train.objectives`), {} if none
    extra: Any = struct.field(default_factory=dict)
