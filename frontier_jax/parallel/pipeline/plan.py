"""How a DeepSeek-V3-shaped model is cut into pipeline chunks, and the `train.pipeline:` section.

The rule (printed by ``frontier-jax describe --mesh ...``): with ``C`` chunks (``mesh.stage``
for gpipe / 1f1b / zb-h1, ``2 mesh.stage`` for interleaved-1f1b and dualpipev) and ``L`` MoE
blocks (``model.num_layers - model.first_k_dense``),

- chunk 0 starts with the token embedding and the dense prefix (the first_k_dense blocks);
- the MoE blocks split into C equal runs of consecutive layers: chunk c holds MoE blocks
  ``[c L/C, (c+1) L/C)``, i.e. model blocks ``first_k_dense + [c L/C, (c+1) L/C)``;
- the last chunk ends with the final norm, the output head, the loss and the MTP modules;
- chunk c runs on rank ``schedule.chunk_rank[c]`` (rank r: chunk r in a loop; chunks r and
  2P-1-r in DualPipeV's V, so rank 0 holds both ends; r, r+P, ... when interleaved).

The MoE stack's parameters (logical axis ``layers``) are sharded over ``stage`` in P contiguous
blocks, which is each rank's chunk in a loop placement; the V and interleaved placements gather
their chunks from those blocks each step. Everything else (embedding, dense prefix, head, MTP) is
replicated over ``stage`` (the SPMD executor runs the ends under a rank-dependent ``cond``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Optional, Protocol

from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.pipeline.schedule import (
    Schedule,
    ScheduleError,
    ScheduleName,
    TickTable,
    build,
    chunks_for,
    lower,
)
from frontier_jax.parallel.pipeline.simulate import Costs, lockstep_makespan, simulate
from frontier_jax.parallel.rules import MESH_AXES, RULE_SETS

# The schedule names as config choices (OmegaConf reads an Enum field by member name).
PipelineSchedule = enum.StrEnum("PipelineSchedule", {s.value: s.value for s in ScheduleName})


@dataclasses.dataclass
class PipelineConfig:
    """`train.pipeline:`.  schedule: the pipeline schedule over the `stage` mesh axis (null: no
    pipeline, mesh.stage must be 1).  The global batch is split into `train.micro_batches`
    micro-batches, which the schedule streams through the stages."""

    schedule: Optional[PipelineSchedule] = None

    def validate(self) -> "PipelineConfig":
        return self  # checked with the mesh and the model: `pipeline_plan`


class PipelineRun(Protocol):
    """What a plan reads of the `train:` section (`train.config.TrainConfig`)."""

    pipeline: PipelineConfig
    micro_batches: int
    global_batch: int


class ModelLayers(Protocol):
    """What a plan reads of the `model:` section (`model.config.ModelConfig`)."""

    num_layers: int
    first_k_dense: int
    mtp_depth: int


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """A schedule (its ranks = mesh.stage, its micro-batches = train.micro_batches) over a model
    of `dense_prefix` dense and `moe_layers` MoE blocks (+ `mtp_depth` MTP modules)."""

    schedule: Schedule
    dense_prefix: int
    moe_layers: int
    mtp_depth: int

    @property
    def stages(self) -> int:
        return self.schedule.ranks

    @property
    def micro_batches(self) -> int:
        return self.schedule.microbatches

    @property
    def chunks(self) -> int:
        return self.schedule.chunks

    @property
    def layers_per_chunk(self) -> int:
        return self.moe_layers // self.chunks

    @functools.cached_property
    def table(self) -> TickTable:
        return lower(self.schedule)

    def chunk_blocks(self, chunk: int) -> range:
        """The model blocks (0 .. num_layers-1, dense prefix first) in chunk `chunk`."""
        start = self.dense_prefix + chunk * self.layers_per_chunk
        return range(start, start + self.layers_per_chunk)

    def rank_parts(self, rank: int) -> list[str]:
        """What rank `rank` runs, chunk by chunk (model block numbers, dense prefix first), e.g.
        ['chunk 0: embedding, dense blocks 0-0, MoE blocks 1-2']."""
        parts = []
        for c in self.schedule.local_chunks[rank]:
            blocks = self.chunk_blocks(c)
            what = []
            if c == 0:
                what.append(
                    "embedding" + (f", dense blocks 0-{self.dense_prefix - 1}" if self.dense_prefix else "")
                )
            what.append(f"MoE blocks {blocks.start}-{blocks.stop - 1}")
            if c == self.chunks - 1:
                what.append("final norm, head, loss" + (f", MTP x{self.mtp_depth}" if self.mtp_depth else ""))
            parts.append(f"chunk {c}: " + ", ".join(what))
        return parts


def build_pipeline_plan(
    schedule: ScheduleName | str,
    stages: int,
    micro_batches: int,
    *,
    num_layers: int,
    first_k_dense: int,
    mtp_depth: int = 0,
) -> PipelinePlan:
    """The plan of `schedule`, checked: it is a schedule, it builds for these sizes (e.g.
    DualPipeV needs micro_batches >= 2 stages) and the MoE blocks split into its chunks."""
    built = build(schedule, stages, micro_batches)
    name = ScheduleName(schedule)
    moe = num_layers - first_k_dense
    chunks = chunks_for(name, stages)
    if moe < chunks or moe % chunks:
        fits = max(chunks, moe // chunks * chunks)
        raise ScheduleError(
            f"model.num_layers={num_layers} with model.first_k_dense={first_k_dense} leaves {moe} MoE blocks; "
            f"schedule {name.value} on mesh.stage={stages} cuts them into {chunks} chunks of equal depth "
            f"(the dense prefix runs with the embedding in chunk 0): use a multiple of {chunks} MoE blocks, "
            f"e.g. model.num_layers={first_k_dense + fits} or {first_k_dense + fits + chunks}"
        )
    return PipelinePlan(built, first_k_dense, moe, mtp_depth)


def check_micro_batch_fits(
    global_batch: int,
    micro_batches: int,
    sizes: Mapping[str, int],
    rules: Mapping[str, Sequence[str]],
    *,
    field: str = "train.global_batch",
) -> None:
    """A pipeline's micro-batch, global_batch / micro_batches rows, must split into whole rows
    over the mesh axes of the `batch` rule (`sizes`: axis -> size, -1 for a size not known yet,
    left out).  Else XLA pads the rows and reshards the padded activations inside the chunks,
    the embedding and the head, which the executor runs under stage-dependent `lax.switch` /
    `lax.cond` branches (executor.py): a resharding collective-permute there waits for the
    devices of every stage, those of the stages in another branch never arrive, and the step
    hangs until the runtime aborts it (on CPU: "only 4 of 8 arrived", exit 134 after 40 s)."""
    axes = [a for a in rules["batch"] if sizes.get(a, 1) > 1]
    ways = math.prod(sizes[a] for a in axes)
    rows = global_batch // micro_batches
    if rows % ways == 0:
        return
    # fewer micro-batches of whole rows per shard (global_batch split over the axes, else none)
    per_shard = global_batch // ways if global_batch % ways == 0 else None
    fewer = per_shard and max(m for m in range(1, micro_batches) if per_shard % m == 0)
    larger = math.ceil(global_batch / (micro_batches * ways)) * micro_batches * ways
    raise ValueError(
        f"train.micro_batches={micro_batches} cuts {field}={global_batch} into micro-batches of {rows} "
        f"rows, which the {ways}-way batch split over mesh axes {axes} "
        f"({', '.join(f'{a}={sizes[a]}' for a in axes)}) cannot divide: a pipeline needs micro-batch rows "
        f"that are a multiple of {ways} (uneven rows are resharded inside the stage-dependent steps, "
        "where that collective waits for the other stages for ever); use "
        + (f"train.micro_batches={fewer} or " if fewer else "")
        + f"{field}={larger}, or a smaller batch split"
    )


def pipeline_plan(train: PipelineRun, mesh: MeshConfig, model: ModelLayers) -> PipelinePlan | None:
    """The stage plan of the `train:`, `mesh:` and `model:` sections (None without a pipeline);
    raises ValueError naming the fields for mesh.stage > 1 without train.pipeline.schedule, a
    schedule on mesh.stage=1, a micro-batch that does not split over the batch axes
    (`check_micro_batch_fits`, with the mesh sizes the config gives; mesh.data=-1 is checked when
    the mesh is built) and for the checks of `build_pipeline_plan`."""
    schedule = train.pipeline.schedule
    if schedule is None:
        if mesh.stage > 1:
            choices = ", ".join(s.value for s in PipelineSchedule)
            raise ValueError(
                f"mesh.stage={mesh.stage} needs a pipeline schedule: set train.pipeline.schedule "
                f"to one of {choices} (and train.micro_batches to the micro-batches it streams), or "
                "keep mesh.stage=1 and split the devices over mesh.data / mesh.fsdp / mesh.expert"
            )
        return None
    if mesh.stage == 1:
        raise ValueError(
            f"train.pipeline.schedule={schedule.value} needs pipeline stages, but mesh.stage=1: set "
            "mesh.stage > 1 to pipeline, or remove train.pipeline.schedule (train.micro_batches "
            "accumulates gradients without a pipeline)"
        )
    sizes = {axis: getattr(mesh, axis) for axis in MESH_AXES}
    check_micro_batch_fits(train.global_batch, train.micro_batches, sizes, RULE_SETS[mesh.rules])
    return build_pipeline_plan(
        schedule,
        mesh.stage,
        train.micro_batches,
        num_layers=model.num_layers,
        first_k_dense=model.first_k_dense,
        mtp_depth=model.mtp_depth,
    )


# Per-chunk pass costs `describe` simulates with: those of one 1F1B stage (F = 1, B = 2 F with
# W = F, DeepSeek's overlapped F&B = 2.5 F), divided among a rank's chunks.
STAGE_COSTS = Costs(F=1.0, B=2.0, W=1.0, FB=2.5)


def describe_plan(plan: PipelinePlan, costs: Costs = STAGE_COSTS) -> dict:
    """Layers per rank and the simulator's figures for `plan`: makespan and bubble fraction (per
    rank in its own order, and lock-step: each executor tick waits for its slowest rank), peak
    live micro-batch activations per rank, and the executor's buffers (slots of one micro-batch
    activation [rows, seq, d] each: input stash and output-cotangent stash of K slots, receive
    slots)."""
    v = plan.schedule.chunks_per_rank
    per_chunk = Costs(
        costs.F / v, costs.B / v, costs.W / v, None if costs.FB is None else costs.FB / v, costs.p2p
    )
    sim = simulate(plan.schedule, per_chunk)
    lockstep = lockstep_makespan(plan.table, per_chunk)
    busy = sum(sim.busy)
    return {
        "schedule": plan.schedule.name,
        "stages": plan.stages,
        "micro_batches": plan.micro_batches,
        "chunks": plan.chunks,
        "moe_blocks_per_chunk": plan.layers_per_chunk,
        "ranks": [plan.rank_parts(r) for r in range(plan.stages)],
        "costs": dataclasses.asdict(per_chunk),
        "makespan": sim.makespan,
        "bubble_fraction": sim.bubble_fraction,
        "lockstep_makespan": lockstep,
        "lockstep_bubble_fraction": 1 - busy / (plan.stages * lockstep),
        "ticks": plan.table.ticks,
        "peak_live": list(sim.peak_live),
        "buffer_slots": buffer_slots(plan.table),
    }


def buffer_slots(table: TickTable) -> int:
    """Micro-batch activations [rows, seq, d] the executor allocates per rank: input stash and
    cotangent stash (K slots each), activation and gradient receive slots."""
    return 2 * table.stash_slots + table.act_slots + table.grad_slots


def format_plan(d: dict) -> str:
    c = d["costs"]
    fb = "" if c["FB"] is None else f", F&B {c['FB']:g}"
    lines = [
        f"pipeline {d['schedule']} on {d['stages']} stages, {d['micro_batches']} micro-batches: "
        f"{d['chunks']} chunks of {d['moe_blocks_per_chunk']} MoE blocks",
    ]
    lines += [f"  rank {r}: " + "; ".join(parts) for r, parts in enumerate(d["ranks"])]
    lines += [
        f"  simulated with per-chunk costs F {c['F']:g}, B {c['B']:g}, W {c['W']:g}{fb}: bubble "
        f"{d['bubble_fraction']:.1%} (makespan {d['makespan']:g}); lock-step executor, {d['ticks']} ticks: "
        f"bubble {d['lockstep_bubble_fraction']:.1%} (makespan {d['lockstep_makespan']:g})",
        f"  live micro-batch activations per rank (peak): {d['peak_live']}; executor buffers: "
        f"{d['buffer_slots']} micro-batch activations per rank (stash, cotangent stash, receive slots)",
    ]
    return "\n".join(lines)
