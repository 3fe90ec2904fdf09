"""`frontier-jax experts`: plan a placement of redundant experts from recorded expert loads,
and plot the loads.

    frontier-jax experts plan --stats FILE --replicas R --devices D [--groups G --nodes N]
                              [--out PLAN.json]
    frontier-jax experts plot --stats FILE --out PNG

--stats: a ledger dump (`generate --expert-stats`, a checkpoint's expert_load.npz: .npz or
.json), a plain [layers, experts] .npy array, or (plot only) a run's metrics.jsonl.  `plan`
prints max / mean per-device load per layer and overall (sum of each layer's busiest device
over the sum of the means) before (no replicas, experts contiguous on devices) and after, and
writes the placement (`parallel/placement.py`: physical_to_logical, logical_to_physical,
copies).  Errors are one `error:` line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_experts_parser(sub) -> None:
    experts = sub.add_parser(
        "experts",
        help="plan redundant experts from recorded loads, plot the loads (frontier-jax experts --help)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = experts.add_subparsers(dest="experts_command", required=True)
    plan = commands.add_parser(
        "plan", help="EPLB-style placement of E experts + R replicas on D devices from an expert-load file"
    )
    plan.add_argument(
        "--stats", required=True, help="expert loads: .npz / .json ledger dump or [layers, experts] .npy"
    )
    plan.add_argument("--replicas", type=int, required=True, help="redundant expert slots per layer (R)")
    plan.add_argument("--devices", type=int, required=True, help="devices on the expert axis (D)")
    plan.add_argument("--groups", type=int, default=1, help="expert groups of the router (model.n_group)")
    plan.add_argument(
        "--nodes", type=int, default=1, help="nodes the devices are on (hierarchical if it divides groups)"
    )
    plan.add_argument("--out", default=None, help="write the placement here (JSON, Placement.save)")
    plan.set_defaults(func=plan_command)
    plot = commands.add_parser("plot", help="heat map layers x experts and max/mean per layer (over time)")
    plot.add_argument(
        "--stats", required=True, help=".npz / .json ledger dump, .npy, or a run's metrics.jsonl"
    )
    plot.add_argument("--out", required=True, help="PNG path")
    plot.set_defaults(func=plot_command)


def _check_out(path: str | None, suffix: str) -> None:
    if path is None:
        return
    out = Path(path)
    if out.suffix != suffix:
        raise ValueError(f"--out {path}: give a {suffix} file")
    if not out.parent.is_dir():
        raise ValueError(f"--out {path}: the directory {out.parent} does not exist")


def format_imbalance(before, after) -> str:
    """The per-layer and overall max / mean table of `plan_command` (before may be None)."""
    (before_layers, before_all) = before or (None, None)
    after_layers, after_all = after
    lines = ["layer  max/mean before  after"]
    for layer, value in enumerate(after_layers):
        was = "-" if before is None else f"{before_layers[layer]:.3f}"
        lines.append(f"{layer:>5}  {was:>15}  {value:.3f}")
    lines.append(f"{'all':>5}  {'-' if before is None else f'{before_all:.3f}':>15}  {after_all:.3f}")
    return "\n".join(lines)


def plan_command(args) -> int:
    from frontier_jax.parallel.placement import Placement, device_load, imbalance, is_hierarchical, plan
    from frontier_jax.runtime.expert_ledger import read_expert_load

    _check_out(args.out, ".json")
    stats = read_expert_load(args.stats)
    placement = plan(
        stats.load, replicas=args.replicas, devices=args.devices, groups=args.groups, nodes=args.nodes
    )
    layers, experts = stats.load.shape
    after = imbalance(device_load(placement, stats.load, args.devices))
    before = (
        imbalance(device_load(Placement.identity(layers, experts), stats.load, args.devices))
        if experts % args.devices == 0
        else None
    )
    hierarchical = is_hierarchical(args.groups, args.nodes)
    policy = (
        f"hierarchical ({args.groups} groups onto {args.nodes} node{'s' * (args.nodes != 1)})"
        if hierarchical
        else "global"
    )
    tokens = "" if stats.tokens is None else f", {stats.tokens:,} tokens"
    print(
        f"{layers} MoE layers x {experts} experts{tokens}: {args.replicas} replicas on {args.devices} devices "
        f"({(experts + args.replicas) // args.devices} slots each), {policy}"
    )
    print(format_imbalance(before, after))
    if before is None:
        print(f"(before: {experts} experts do not split over {args.devices} devices without replicas)")
    if args.out:
        placement.save(args.out)
        print(f"placement in {args.out}")
    return 0


def plot_command(args) -> int:
    from frontier_jax.runtime.expert_plot import plot_expert_load, read_plot_data

    _check_out(args.out, ".png")
    plot_expert_load(read_plot_data(args.stats), args.out, Path(args.stats).name)
    print(f"plot in {args.out}", file=sys.stderr)
    return 0
