"""The pure training step: `train_step(state, batch) -> (state, metrics)`, built from three parts:

    objective   (model, batch, normalisers) -> (loss, metrics, aux)      `objectives/`
                what is minimised, which batch it reads and which of its rows are in use
                (pre-training: `Pretrain`)
    strategy    (params, biases, batch, objective, normalisers)          `strategy.py`
                -> (loss, metrics, aux loads, grads)
                how the global batch is turned into gradients (micro-batch scan, or
                pipeline stages over the mesh's `stage` axis)
    update tail clip + AdamW + loss-free bias update + non-finite guard  `update.py`

One step: the objective prepares the global batch (with its own state `TrainState.extra`; the
batch-size ramp is applied by the data: its batch at step k holds `batch_size_at(k)` rows read
from the data, the rest padding that the objective switches off, see `data/batching.py`) and
computes its normalisers from all of it, the strategy sums the micro-batch losses and gradients,
the update tail applies them.  State: `TrainState` (params, biases, opt_state, step, rng, extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from frontier_jax.model import Transformer
from frontier_jax.runtime.program import ModelProgram, model_program
from frontier_jax.train.objectives import Objective, initial_extra
from frontier_jax.train.objectives.pretrain import Pretrain
from frontier_jax.train.optimizer import build_optimizer, learning_rate_schedule
from frontier_jax.train.state import TrainState
from frontier_jax.train.strategy import GradientStrategy, gradient_strategy
from frontier_jax.train.update import apply_update

if TYPE_CHECKING:  # the composed config sits above train
    from frontier_jax.config import Config


EXPERT_LOAD = "moe_load"  # the step's expert loads [L_moe, N_r] among its metrics


def _stack_tag(path) -> str:
    """'mtp' or 'moe': the metric prefix of a bias / load leaf."""
    return "mtp" if "mtp" in jax.tree_util.keystr(path) else "moe"


class Trainer:
    """Builds the model's abstract structure once and exposes pure `init` / `train_step`."""

    def __init__(
        self,
        cfg: Config,
        mesh: Mesh | None = None,
        *,
        objective: Objective | None = None,
        strategy: GradientStrategy | None = None,
        program: ModelProgram | None = None,
    ):
        """mesh: when given, activations are constrained to it by the `cfg.mesh.rules` table.
        objective: default `Pretrain` of cfg; strategy: default `gradient_strategy(cfg.train, program)`
        (micro-batch accumulation over `cfg.train.micro_batches`, or pipeline stages with
        `train.pipeline.schedule`); program: the model program of `cfg` on `mesh`, when already built."""
        self.cfg = cfg
        self.program = program or model_program(cfg, mesh)
        self.mesh = self.program.mesh
        self.rules, self.policy = self.program.rules, self.program.policy
        self.abstract_params = self.program.abstract_params
        self.abstract_biases = self.program.abstract_biases
        self.objective = objective or Pretrain(cfg.train, cfg.model, mask_documents=cfg.data.mask_documents)
        self.strategy = strategy or gradient_strategy(cfg.train, self.program)
        decay_mask = jax.tree.map(
            lambda v: "norm" not in v.get_metadata()["logical_axes"],
            self.abstract_params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        self.optimizer = build_optimizer(cfg.train, nnx.to_pure_dict(decay_mask))
        self.schedule = learning_rate_schedule(cfg.train)

    # ------------------------------------------------------------------ state
    def init(self, seed: int) -> TrainState:
        """A fresh state: parameters and biases initialised from `seed`."""
        return self.start(*self.program.init(seed), seed)

    def start(self, params: dict, biases: dict, seed: int) -> TrainState:
        """The state of step 0 from given parameters and biases (a fresh run's, or another run's:
        `train.init_from`): new optimizer state, the rng of `seed`, the objective's initial state."""
        return TrainState(
            params=params,
            biases=biases,
            opt_state=self.optimizer.init(params),
            step=jnp.zeros((), jnp.int32),
            rng=jax.random.key_data(jax.random.key(seed + 1)),
            extra=initial_extra(self.objective, params, biases),
        )

    def model(self, params: dict, biases: dict) -> Transformer:
        return self.program.model(params, biases)

    # ------------------------------------------------------------------- step
    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with self.program.sharding_context():
            return self._train_step(state, batch)

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        cfg = self.cfg.train
        prepared = self.objective.prepare(batch, state.extra)
        norm = self.objective.normalisers(prepared, self.strategy.micro_batches)
        loss, metrics, loads, grads = self.strategy(
            state.params, state.biases, prepared, self.objective, norm
        )
        new_state, grad_norm, finite = apply_update(
            state, loss, grads, loads, self.optimizer, cfg.bias_update_speed
        )
        advance = getattr(self.objective, "next_extra", None)
        if advance is not None:  # the objective's state after the update (e.g. a reference reset)
            new_state = new_state.replace(extra=advance(new_state.extra, new_state.params, new_state.step))

        out = {
            "loss": loss,
            **self.objective.summarize(metrics, norm),
            "grad_norm": grad_norm,
            "lr": self.schedule(state.step),
            "finite": finite.astype(jnp.int32),
        }
        for path, load in jax.tree_util.tree_leaves_with_path(loads):
            out[f"{_stack_tag(path)}_load_max_over_mean"] = load.max(-1) / jnp.maximum(load.mean(-1), 1e-9)
            if _stack_tag(path) == "moe":
                out[EXPERT_LOAD] = load  # [L, N_r] for the loop's expert-load ledger
        for path, bias in jax.tree_util.tree_leaves_with_path(new_state.biases):
            out[f"{_stack_tag(path)}_bias_range"] = bias.max(-1) - bias.min(-1)
        return new_state, out
