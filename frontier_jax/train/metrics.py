"""Metrics out of the loop: JSONL + TensorBoard, MFU, and the loss-curve plot.

MFU = (model FLOPs per token x tokens/s) / (peak FLOP/s per device x devices), with the
model FLOPs from `describe` and the peak a measured dense bf16 matmul ceiling of the device
(`PEAK_FLOPS`, see shared/DEVICE.md); devices without a figure report no MFU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

# Measured dense bf16 matmul ceilings (FLOP/s) by device kind substring: cuBLAS 8192^3 on random
# data (`benchmarks/ceilings.py`; H200 2026-12-01 with B stored [N, K], 721 with B [K, N]).
PEAK_FLOPS = {"H100": 729e12, "H200": 769e12}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind
    return next((flops for name, flops in PEAK_FLOPS.items() if name in kind), None)


def model_flops_utilization(flops_per_token: float, tokens_per_s: float) -> float | None:
    peak = peak_flops_per_device()
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * jax.device_count())


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank or partly written one."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLogger:
    """Appends one JSON object per record to run_dir/metrics.jsonl and mirrors scalars (and
    per-layer lists as layer_i scalars) to TensorBoard event files under run_dir/tensorboard.

    `resumed_at`: the step a resumed run restarts after; the records of later steps (logged
    before the run was interrupted, and about to be replayed) are dropped from metrics.jsonl
    and purged from TensorBoard, so each step keeps one record."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, resumed_at: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        path = Path(run_dir) / "metrics.jsonl"
        if resumed_at and path.exists():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if (step := _step_of(line)) is not None and step <= resumed_at
            ]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        self.jsonl = open(path, "a", encoding="utf-8")
        self.tb = SummaryWriter(
            str(Path(run_dir) / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None
        )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key == "step":
                continue
            if isinstance(value, list):
                for i, v in enumerate(value):
                    self.tb.add_scalar(f"{key}/layer_{i}", v, step)
            else:
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def read_step_records(metrics_path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl, one per step in step order (a resumed run may log a step
    twice: the last record of it is kept)."""
    lines = Path(metrics_path).read_text().splitlines()
    by_step = {record["step"]: record for record in (json.loads(line) for line in lines if line.strip())}
    return [by_step[step] for step in sorted(by_step)]


def plot_loss_curve(metrics_path: Path, out_path: Path) -> None:
    """Next-token CE (and MTP loss) against step from metrics.jsonl, saved as a PNG (the
    objective's loss where it reports no CE)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {r["step"]: r for r in read_step_records(metrics_path)}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(7, 4))
    language_model = all("ce_loss" in by_step[s] for s in steps)  # else another objective's loss
    if language_model:
        ax.plot(steps, [by_step[s]["ce_loss"] for s in steps], label="next-token CE")
    else:
        ax.plot(steps, [by_step[s]["loss"] for s in steps], label="loss")
    if all("mtp_loss" in by_step[s] for s in steps):
        ax.plot(steps, [by_step[s]["mtp_loss"] for s in steps], label="MTP CE", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)" if language_model else "loss")
    ax.set_title(f"training loss ({Path(metrics_path).parent.name})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
