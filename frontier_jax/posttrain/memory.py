"""Per-device memory of a `frontier-jax grpo` run beyond the trainer's (`runtime.memory`: the
policy's parameters, gradients, optimizer moments and activations), all in one process:

    reference      grpo.beta > 0: the frozen reference, a copy of the policy's parameters sharded
                   like them (beta 0 keeps none)
    engine weights none of their own: `Engine.load_weights` re-places each trainer array with the
                   dtype and sharding it already has, which keeps the same buffer
    latent cache   the rollout engine's paged cache, replicated on every device:
                       N P (L + D)(d_c + d_h^R) x itemsize(compute dtype) bytes,
                       N = 1 + max(infer.max_seqs, train.global_batch) ceil(train.seq_len / P)
                   (`infer.cache`; P = infer.block_size, D MTP modules)
    reward models  each `{name: model, checkpoint: RUN}` reward's parameters as saved, whole on
                   every device (its default mesh is data parallel)
"""

from __future__ import annotations

from dataclasses import dataclass

from jax.sharding import AbstractMesh

from frontier_jax.infer.cache import CacheLayout
from frontier_jax.parallel.rules import MESH_AXES
from frontier_jax.posttrain.grpo import rollout_infer
from frontier_jax.runtime.memory import DeviceMemory, format_bytes, state_bytes
from frontier_jax.runtime.program import ModelProgram
from frontier_jax.runtime.restore import saved_program


@dataclass(frozen=True)
class GRPOMemory:
    """Bytes per device of the module docstring's terms (reward_models: checkpoint -> bytes)."""

    reference: int
    latent_cache: int
    reward_models: dict[str, int]

    @property
    def total(self) -> int:
        return self.reference + self.latent_cache + sum(self.reward_models.values())


def grpo_memory(program: ModelProgram, cfg, mem: DeviceMemory) -> GRPOMemory:
    """The module docstring's terms for the run config `cfg` (train, infer, grpo sections) on the
    mesh `mem` was computed for (`runtime.memory.device_memory`)."""
    mesh = AbstractMesh(tuple(mem.mesh.values()), tuple(mem.mesh))
    reference = state_bytes(program.abstract_params, mesh, program.rules) if cfg.grpo.beta > 0 else 0
    infer = rollout_infer(cfg.infer, cfg.train)
    dtype = program.policy.compute_dtype
    cache = CacheLayout.plan(cfg.model, infer, dtype).bytes(cfg.model, dtype)
    one_device = AbstractMesh((1,) * len(MESH_AXES), MESH_AXES)
    models = {}
    for spec in cfg.grpo.rewards_config().functions:
        if spec.name == "model" and "checkpoint" in spec.options:
            saved = saved_program(spec.options["checkpoint"], spec.options.get("step"))
            models[str(spec.options["checkpoint"])] = state_bytes(
                saved.abstract_params, one_device, saved.rules
            ) + state_bytes(saved.abstract_biases, one_device, saved.rules)
    return GRPOMemory(reference, cache, models)


def format_grpo_memory(grpo: GRPOMemory, mem: DeviceMemory) -> str:
    """The rows added to `runtime.memory.format_memory`'s table, and the one-process total."""
    rows = [
        ("reference (grpo.beta > 0)", grpo.reference),
        ("rollout engine weights", 0),
        ("rollout latent cache", grpo.latent_cache),
        *((f"reward model {path}", n) for path, n in grpo.reward_models.items()),
        ("total with the trainer's", mem.total + grpo.total),
    ]
    notes = {"rollout engine weights": "the trainer's arrays, not a copy"}
    lines = ["GRPO in the same process, per device"]
    for label, n in rows:
        note = notes.get(label)
        lines.append(f"  {label:<30} {format_bytes(n):>14}" + (f"   ({note})" if note else ""))
    return "\n".join(lines)
