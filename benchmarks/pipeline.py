"""Pipeline schedules on a given number of stages: the simulator's prediction and the SPMD
executor's per-tick overhead.

    python benchmarks/pipeline.py [--stages 4] [--microbatches 8] [--costs 1,2,1,2.5] [--dim 64]

For each schedule: ticks of the lowered table, stash / receive slots per rank, the simulator's
makespan, bubble fraction and peak live activations (per-chunk costs F,B,W,F&B; the two-chunk
schedules get half per chunk), the lock-step makespan (each tick waits for its slowest rank),
and the executor's measured time per tick for a toy model (one tanh layer per chunk of width
``--dim``) on fake CPU devices. On CPU the per-tick time is the executor's fixed overhead (switch,
two ppermutes, slot writes), not a GPU measurement.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from frontier_jax.parallel.pipeline import schedule as S  # noqa: E402
from frontier_jax.parallel.pipeline.executor import pipeline_value_and_grad, stack_for_stages  # noqa: E402
from frontier_jax.parallel.pipeline.simulate import Costs, lockstep_makespan, simulate  # noqa: E402


def _toy(chunks: int, microbatches: int, dim: int):
    k = jax.random.split(jax.random.key(0), 4)
    params = 0.1 * jax.random.normal(k[0], (chunks, dim, dim))
    ends = {"embed": jax.random.normal(k[1], (97, dim)), "head": jax.random.normal(k[2], (dim, 97))}
    tokens = jax.random.randint(k[3], (microbatches, 4, 33), 0, 97)
    batch = {"tokens": tokens[..., :-1], "labels": tokens[..., 1:]}

    def embed(e, b):
        return e["embed"][b["tokens"]]

    def chunk(w, x, b, c):
        return x + jnp.tanh(x @ w), jnp.float32(0), {}

    def head(e, x, b):
        logp = jax.nn.log_softmax(x @ e["head"], -1)
        return -jnp.mean(jnp.take_along_axis(logp, b["labels"][..., None], -1)), {}

    return (params, ends, batch), (embed, chunk, head)


def _time_per_tick(table: S.TickTable, dim: int, repeats: int = 5) -> float:
    P = table.schedule.ranks
    mesh = jax.make_mesh((P,), ("stage",), devices=jax.devices()[:P], axis_types=(AxisType.Auto,))
    (params, ends, batch), fns = _toy(table.schedule.chunks, table.schedule.microbatches, dim)
    step = jax.jit(pipeline_value_and_grad(table, mesh, *fns))
    args = (stack_for_stages(table, params), ends, batch)
    jax.block_until_ready(step(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(step(*args))
    return (time.perf_counter() - start) / repeats / table.ticks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--costs", default="1,2,1,2.5", help="F,B,W,F&B of one 1F1B stage")
    parser.add_argument("--dim", type=int, default=64)
    args = parser.parse_args(argv)
    f, b, w, fb = (float(x) for x in args.costs.split(","))
    if args.stages > len(jax.devices()):
        print(f"error: --stages={args.stages} exceeds the {len(jax.devices())} devices", file=sys.stderr)
        return 2
    print(
        f"{'schedule':18} {'ticks':>5} {'stash':>5} {'recv':>5} {'makespan':>8} {'bubble':>7} "
        f"{'peak':>5} {'lockstep':>8} {'ms/tick':>8}"
    )
    for name in S.ScheduleName:
        try:
            sched = S.build(name, args.stages, args.microbatches)
        except S.ScheduleError as e:
            print(f"{name.value:18} skipped: {e}")
            continue
        scale = 1.0 / sched.chunks_per_rank
        costs = Costs(f * scale, b * scale, w * scale, fb * scale)
        table = S.lower(sched)
        sim = simulate(sched, costs)
        per_tick = _time_per_tick(table, args.dim)
        print(
            f"{name.value:18} {table.ticks:5d} {table.stash_slots:5d} {table.act_slots + table.grad_slots:5d} "
            f"{sim.makespan:8.2f} {sim.bubble_fraction:7.1%} {max(sim.peak_live):5d} "
            f"{lockstep_makespan(table, costs):8.2f} {per_tick * 1e3:8.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
