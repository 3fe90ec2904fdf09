"""A model program: the model of a config set up on a mesh, without an optimizer.

    ModelProgram = config, mesh (or None: no activation constraints), rules table,
                   precision policy, expert dispatcher, graphdef, abstract parameters,
                   expert biases and expert slots (nnx Variables carrying `logical_axes`;
                   slots only with `impl.expert_replicas`, filled with the default placement)

The config is any object with the `model`, `mesh`, `precision` and `impl` sections
(`ProgramSections`: a run `Config`, or `ModelSections`).  The model comes from the one factory,
`model.build_model`, with the program's policy and expert dispatcher.

This is the door every consumer takes: training adds an optimizer, a train state and a jitted
step on top (`train.loop.build_runner`); evaluation, inference, per-token log-probabilities
(`logprobs.py`), the parameters-only restore (`restore.py`) and memory estimates (`memory.py`)
build the same program and merge parameters into it.  Evaluation and inference compute as
`inference_impl` says: with dropless expert dispatch whatever the run trained with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import jax
from flax import nnx
from jax.sharding import Mesh
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from frontier_jax.model import ModelConfig, Transformer, build_model
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.head import require_lm_head
from frontier_jax.model.moe import ExpertSlots, default_slots
from frontier_jax.model.routing import ExpertBias
from frontier_jax.ops.dispatch import ExpertDispatcher, MoeDispatch
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.expert import expert_dispatcher
from frontier_jax.parallel.mesh import build_mesh, check_divisible, state_shardings
from frontier_jax.parallel.rules import RULE_SETS, use_sharding
from frontier_jax.precision import PrecisionPolicy, get_policy
from frontier_jax.precision.config import PrecisionConfig


class ProgramSections(Protocol):
    """The sections of a run config that a model program reads (a run `Config` has them)."""

    model: ModelConfig
    mesh: MeshConfig
    precision: PrecisionConfig
    impl: ImplConfig


@dataclasses.dataclass(frozen=True)
class ModelSections:
    """`ProgramSections` on their own, without a whole run config."""

    model: ModelConfig
    mesh: MeshConfig
    precision: PrecisionConfig
    impl: ImplConfig = dataclasses.field(default_factory=ImplConfig)


@dataclasses.dataclass(frozen=True)
class ModelProgram:
    cfg: ProgramSections
    mesh: Mesh | None
    rules: Mapping[str, Sequence[str]]
    policy: PrecisionPolicy
    experts: ExpertDispatcher  # local, or all-to-all where the mesh splits the experts
    graphdef: nnx.GraphDef
    abstract_params: nnx.State  # trained parameters (nnx.Param), shapes only
    abstract_biases: nnx.State  # expert-selection biases (ExpertBias), shapes only
    abstract_slots: nnx.State  # expert placements (ExpertSlots, impl.expert_replicas), shapes only

    def model(self, params: dict, biases: dict) -> Transformer:
        """The Transformer holding `params` and `biases` (pure dicts, as in the train state), its
        expert slots (if any) holding the default placement (`model.moe.default_slots`)."""
        slots = default_slots(nnx.to_pure_dict(self.abstract_slots))
        return nnx.merge(self.graphdef, params, biases, slots)

    def init(self, seed: int) -> tuple[dict, dict]:
        """Freshly initialised (params, biases) as pure dicts."""
        model = self.build(nnx.Rngs(seed))
        _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(biases)

    def build(self, rngs: nnx.Rngs) -> Transformer:
        """A new model of this program (`model.build_model` with its policy and dispatcher)."""
        cfg = self.cfg
        return build_model(cfg.model, impl=cfg.impl, policy=self.policy, experts=self.experts, rngs=rngs)

    def require_lm_head(self, what: str) -> None:
        """Raises ValueError (one line) naming `what` when this program's model has no LM head
        (model.head=scalar): an `Engine`, the scorer and log-probabilities need next-token logits."""
        require_lm_head(self.cfg.model, what)

    def shardings(self) -> tuple[dict, dict]:
        """NamedShardings of (params, biases) on the mesh, by the rules table."""
        if self.mesh is None:
            raise ValueError("this model program has no mesh; build it with build_model_program")
        return (
            state_shardings(self.abstract_params, self.mesh, self.rules),
            state_shardings(self.abstract_biases, self.mesh, self.rules),
        )

    def sharding_context(self):
        """Activations constrained to the mesh by the rules table (nothing without a mesh)."""
        return contextlib.nullcontext() if self.mesh is None else use_sharding(self.mesh, self.rules)

    def with_impl(self, impl: ImplConfig) -> ModelProgram:
        """The same model on the same mesh computed as `impl` says.  The `impl` section never
        changes the parameters' names, shapes or layout, so this program's parameters fit."""
        if impl == self.cfg.impl:
            return self
        return model_program(dataclasses.replace(self.cfg, impl=impl), self.mesh)


def inference_impl(trained: ImplConfig, given: Mapping[str, object] | None = None) -> ImplConfig:
    """How inference and evaluation compute a model trained with `trained`: the same choices but
    dropless expert dispatch, then `given` (impl.key=value set at load, checked by ImplConfig's
    types) on top.

    Capacity dispatch keeps at most C = ceil(f N K / E) assignments per expert out of the N
    tokens of one forward, so under it a request's tokens and a window's log-likelihoods would
    depend on the requests and windows batched with it.  Dispatch is how the model is computed,
    not a parameter: the dropless forward is the model the parameters define.  An explicit
    moe_dispatch other than dropless wins, with one warning."""
    given = dict(given or {})
    try:
        impl = OmegaConf.to_object(
            OmegaConf.merge(
                OmegaConf.structured(dataclasses.replace(trained, moe_dispatch=MoeDispatch.dropless)),
                given,
            )
        ).validate()
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ValueError(
            f"invalid override impl.{key}: {str(err).splitlines()[0]} "
            "(fields: ImplConfig in frontier_jax/model/config.py)"
        ) from None
    if impl.moe_dispatch != MoeDispatch.dropless:
        logging.getLogger(__name__).warning(
            "impl.moe_dispatch=%s given: each forward drops expert assignments past the capacity "
            "(impl.moe_capacity_factor=%s) of the tokens it runs, so outputs depend on what is "
            "batched together; without the override inference and evaluation dispatch dropless",
            impl.moe_dispatch,
            impl.moe_capacity_factor,
        )
    return impl


def model_program(cfg: ProgramSections, mesh: Mesh | None = None) -> ModelProgram:
    """The abstract model of `cfg` (no weight allocated), its policy, rules table and expert
    dispatcher for `mesh`."""
    policy, rules = get_policy(cfg.precision.policy), RULE_SETS[cfg.mesh.rules]
    experts = expert_dispatcher(mesh, rules)
    abstract = nnx.eval_shape(
        lambda: build_model(cfg.model, impl=cfg.impl, policy=policy, experts=experts, rngs=nnx.Rngs(0))
    )
    graphdef, params, biases, slots = nnx.split(abstract, nnx.Param, ExpertBias, ExpertSlots)
    return ModelProgram(cfg, mesh, rules, policy, experts, graphdef, params, biases, slots)


def build_model_program(
    cfg: ProgramSections, devices: Sequence[jax.Device] | None = None, *, mesh: Mesh | None = None
) -> ModelProgram:
    """`model_program` on `mesh` (default: `cfg.mesh` over `devices`, default all), with every
    parameter's sharded dimensions checked to divide by their mesh axes."""
    mesh = build_mesh(cfg.mesh, devices) if mesh is None else mesh
    program = model_program(cfg, mesh)
    check_divisible(program.abstract_params, mesh, program.rules)
    check_divisible(program.abstract_biases, mesh, program.rules)
    return program
