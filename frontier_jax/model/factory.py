"""The one place a model is constructed: `build_model` (every consumer gets its model from here,
through `runtime.ModelProgram`)."""

from __future__ import annotations

from flax import nnx

from frontier_jax.model.config import ImplConfig, ModelConfig
from frontier_jax.model.transformer import Transformer
from frontier_jax.ops.dispatch import ExpertDispatcher, LocalExperts
from frontier_jax.precision import PrecisionPolicy


def build_model(
    cfg: ModelConfig,
    *,
    impl: ImplConfig = ImplConfig(),
    policy: PrecisionPolicy | None = None,
    experts: ExpertDispatcher = LocalExperts(),
    rngs: nnx.Rngs,
) -> Transformer:
    """The model of `cfg` (trunk, final norm and the `cfg.head` head: LM or scalar), computed as
    `impl` says, with `policy`'s projections (default fp32) and `experts` dispatching the routed
    experts (default local; `parallel.expert.expert_dispatcher` for a mesh with an `expert` axis).
    Wrap it in `nnx.eval_shape` for shapes without allocating a weight."""
    return Transformer(cfg, impl=impl, policy=policy, experts=experts, rngs=rngs)
