"""Expert-parallel training of a model over all local GPUs, with a one-device reference.

    python benchmarks/multi_gpu.py --config model/bench-1b --mesh configs/mesh/gpu-8.yaml \
        [--per-device-batch 16] [--seq-len 2048] [--steps 10] [--check-steps 5] [key=value ...]

1. Correctness: the losses of the first `--check-steps` steps on the mesh equal those of the
   same global batch on one device (run with gradient accumulation, micro-batches of the
   per-device batch, so it fits), within bf16 tolerance.
2. Speed: median step time, tokens/s per device, MFU, and the share of device time spent in
   all-to-all collectives (from a `jax.profiler` trace of 3 steps).
3. Scaling efficiency: tokens/s per device on the mesh over tokens/s of one device running its
   per-device batch alone (same script, same process).
4. The collectives of the compiled mesh step: how many of each kind, and how many XLA
   scheduled asynchronously (start/done pairs, which can overlap compute) vs synchronously.
Overrides (key=value) are applied last, so `mesh.expert=1 mesh.data=2` reshapes a preset.
Synthetic uniform-random tokens; bf16 compute, no MTP (as `benchmarks/train_step.py`).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_step import summarise  # noqa: E402
from synthetic import synthetic_batches  # noqa: E402

from frontier_jax.config import load_config  # noqa: E402
from frontier_jax.model.describe import describe  # noqa: E402
from frontier_jax.parallel.mesh import build_mesh  # noqa: E402
from frontier_jax.train.loop import build_runner  # noqa: E402
from frontier_jax.train.metrics import peak_flops_per_device  # noqa: E402

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")


def collective_counts(hlo: str) -> dict[str, dict[str, int]]:
    """Per collective kind in optimized HLO text: {"async": n, "sync": n}.  Async ones appear
    as `<kind>-start` (or an `async-start` wrapping the collective), sync ones as `<kind>(`."""
    counts = {}
    for kind in COLLECTIVES:
        started = len(re.findall(rf"= [^=]*? {kind}-start\(", hlo))
        wrapped = len(re.findall(rf"async-start\([^\n]*calls=%?[\w.-]*{kind}", hlo))
        plain = len(re.findall(rf"= [^=]*? {kind}\(", hlo))
        if started or wrapped or plain:
            counts[kind] = {"async": started + wrapped, "sync": plain - wrapped}
    return counts


def losses(cfg, devices, batches) -> list[float]:
    runner = build_runner(cfg, devices)
    state, step, in_batch = runner.init(cfg.train.seed), runner.step, runner.batch_sharding
    out = []
    for batch in batches:
        state, metrics = step(state, jax.device_put(batch, in_batch))
        out.append(float(metrics["loss"]))
    return out


def timed(cfg, devices, batch, steps: int, profile_dir: Path | None) -> tuple[float, float | None]:
    """(median step seconds, all-to-all share of device time or None)."""
    runner = build_runner(cfg, devices)
    state, step = runner.init(cfg.train.seed), runner.step
    batch = jax.device_put(batch, runner.batch_sharding)
    for _ in range(2):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    share = None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
        with jax.profiler.trace(str(profile_dir)):
            for _ in range(3):
                state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
        rows = summarise(profile_dir, 3, 10**6)
        total = sum(ms for _, ms, _ in rows)
        share = sum(ms for name, ms, _ in rows if "all-to-all" in name) / total if total else None
    return statistics.median(times), share


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-1b")
    parser.add_argument("--mesh", default="configs/mesh/gpu-8.yaml", help="a YAML with a mesh: block")
    parser.add_argument("--per-device-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--check-steps", type=int, default=5)
    parser.add_argument("--profile-dir", default="/tmp/multi_gpu_profile")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()

    devices = jax.devices()
    n = len(devices)
    mesh_cfg = load_config(args.mesh).mesh
    mesh_overrides = [
        f"mesh.{axis}={getattr(mesh_cfg, axis)}" for axis in ("stage", "data", "fsdp", "expert", "tensor")
    ]
    mesh_overrides += [
        f"mesh.dcn.{axis}={getattr(mesh_cfg.dcn, axis)}"
        for axis in ("stage", "data", "fsdp", "expert", "tensor")
    ]
    base = ["precision.policy=bf16", "model.mtp_depth=0", f"train.seq_len={args.seq_len}"]
    global_batch = args.per_device_batch * n
    cfg = load_config(
        args.config, base + mesh_overrides + [f"train.global_batch={global_batch}", *args.overrides]
    )
    one_device = [a for a in args.overrides if not a.startswith("mesh.")] + ["mesh.data=1", "mesh.expert=1"]
    one = load_config(
        args.config, base + [f"train.global_batch={global_batch}", f"train.micro_batches={n}", *one_device]
    )
    print(
        f"{n} x {devices[0].device_kind}; mesh {dict(build_mesh(cfg.mesh, devices).shape)}; "
        f"global batch {global_batch} x seq {args.seq_len}",
        flush=True,
    )

    batches = synthetic_batches(cfg.model.vocab_size, global_batch, args.seq_len, args.check_steps)
    mesh_losses = losses(cfg, devices, batches)
    ref_losses = losses(one, devices[:1], batches)
    worst = max(abs(a - b) / abs(b) for a, b in zip(mesh_losses, ref_losses))
    print("step  loss (mesh)   loss (1 device, accumulated)")
    for i, (a, b) in enumerate(zip(mesh_losses, ref_losses), 1):
        print(f"{i:4d}  {a:11.5f}   {b:11.5f}")
    print(f"max relative difference {worst:.2e} ({'ok' if worst < 2e-2 else 'EXCEEDS'} bf16 tolerance 2e-2)")

    flops = describe(cfg.model, args.seq_len)["flops_per_token"]
    peak = peak_flops_per_device()
    runner = build_runner(cfg, devices)
    state = jax.eval_shape(lambda: runner.init(cfg.train.seed))
    hlo = runner.step.lower(state, jax.device_put(batches[0], runner.batch_sharding)).compile().as_text()
    print("collectives in the compiled mesh step:", collective_counts(hlo))
    seconds, a2a = timed(cfg, devices, batches[0], args.steps, Path(args.profile_dir))
    per_device = global_batch * args.seq_len / seconds / n
    single = load_config(args.config, base + [f"train.global_batch={args.per_device_batch}", *one_device])
    single_seconds, _ = timed(
        single, devices[:1], {k: v[: args.per_device_batch] for k, v in batches[0].items()}, args.steps, None
    )
    single_tps = args.per_device_batch * args.seq_len / single_seconds
    mfu = f"{flops * per_device / peak:.1%}" if peak else "n/a"
    print(
        f"mesh: step {seconds * 1e3:.1f} ms, {per_device:,.0f} tokens/s per device, MFU {mfu}, "
        f"all-to-all {'n/a' if a2a is None else f'{a2a:.1%}'} of device time"
    )
    print(
        f"one device, per-device batch: step {single_seconds * 1e3:.1f} ms, {single_tps:,.0f} tokens/s; "
        f"scaling efficiency {per_device / single_tps:.1%}"
    )


if __name__ == "__main__":
    main()
