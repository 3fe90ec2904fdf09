"""The expert-load ledger as a picture: a heat map of load / mean load (layers x experts) and
max / mean per MoE layer, over time when the input is a time series.

Inputs (`read_plot_data`): a ledger dump (.npz / .json; an .npz with more than one step also
gives max / mean per layer at every step), a plain [layers, experts] .npy, or a training run's
metrics.jsonl (its `moe_window_load_max_over_mean` records: a time series, no heat map).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from frontier_jax.parallel.placement import imbalance
from frontier_jax.runtime.expert_ledger import read_expert_load, read_ledger_steps

# metrics.jsonl's per-layer window figure (train/loop.py WINDOW_IMBALANCE)
METRICS_KEY = "moe_window_load_max_over_mean"


class PlotData(NamedTuple):
    load: np.ndarray | None  # [L, E] window load, or None (metrics.jsonl)
    steps: np.ndarray | None  # [T] step numbers of the time series, or None
    series: np.ndarray | None  # [T, L] max / mean per layer at each step
    step_label: str = "step"


def read_plot_data(path: str | Path) -> PlotData:
    path = Path(path)
    if path.suffix == ".jsonl":
        return _metrics_series(path)
    stats = read_expert_load(path)
    if path.suffix == ".npz":
        steps = read_ledger_steps(path)
        if len(steps.tokens) > 1:
            series = imbalance(steps.loads)[0]  # each step's own loads
            return PlotData(stats.load, np.arange(1, len(steps.tokens) + 1), series, "step of the window")
    return PlotData(stats.load, None, None)


def _metrics_series(path: Path) -> PlotData:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    by_step = {}
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if METRICS_KEY in record:
            by_step[record["step"]] = record[METRICS_KEY]  # a resumed run's replayed step: the last
    if not by_step:
        raise ValueError(f"{path}: no {METRICS_KEY} records (a run of a model with MoE layers logs them)")
    steps = np.asarray(sorted(by_step))
    series = np.asarray([by_step[s] for s in steps], np.float64)
    return PlotData(None, steps, series, "training step (max / mean over the window)")


def plot_expert_load(data: PlotData, out: str | Path, title: str) -> None:
    """The heat map (when there is a load) and max / mean per layer (over time when there is a
    series, else one bar per layer), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = int(data.load is not None) + 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = axes[0]
    if data.load is not None:
        load = np.asarray(data.load, np.float64)
        mean = load.mean(1, keepdims=True)
        relative = np.divide(load, mean, out=np.ones_like(load), where=mean > 0)
        image = axes[0].imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=axes[0], label="load / layer mean")
        axes[0].set_xlabel("expert")
        axes[0].set_ylabel("MoE layer")
        axes[0].set_title("expert load (window)")
        axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[-1]
    if data.series is not None:
        for layer in range(data.series.shape[1]):
            ax.plot(data.steps, data.series[:, layer], label=f"layer {layer}")
        ax.set_xlabel(data.step_label)
    else:
        per_layer = imbalance(data.load)[0]
        ax.bar(np.arange(len(per_layer)), per_layer)
        ax.set_xlabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("max / mean expert load")
    ax.set_title("imbalance per layer")
    ax.grid(alpha=0.3)
    if data.series is not None and data.series.shape[1] <= 12:
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
