"""`frontier-jax experts plan / plot`: the printed max/mean before and after against numpy
sums of the loads, the written placement, the plots of each input kind, and one-line errors
with exit code 2."""

import json

import numpy as np
import pytest

from frontier_jax.cli import main
from frontier_jax.parallel.placement import Placement, plan
from frontier_jax.runtime.expert_ledger import ExpertLedger, save_expert_load

LOAD = np.array([[400, 300, 200, 100, 10, 10, 10, 10], [50, 50, 50, 50, 60, 40, 30, 70]], np.int64)


def _table(out: str) -> dict:
    """{layer or 'all': (before, after)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) == 3 and (cells[0].isdigit() or cells[0] == "all"):
            rows[cells[0]] = (float(cells[1]), float(cells[2]))
    return rows


def test_plan_prints_before_and_after_and_writes_the_placement(tmp_path, capsys):
    ledger = ExpertLedger(2, 8, window_steps=4)
    ledger.record(LOAD, 1000)
    save_expert_load(tmp_path / "stats.npz", ledger.steps())
    args = ["experts", "plan", "--stats", str(tmp_path / "stats.npz"), "--replicas", "8", "--devices", "4"]
    assert main(args + ["--out", str(tmp_path / "plan.json")]) == 0
    rows = _table(capsys.readouterr().out)
    before = LOAD.reshape(2, 4, 2).sum(-1)  # experts 2d, 2d+1 on device d
    placement = Placement.load(tmp_path / "plan.json")
    assert np.array_equal(
        placement.physical_to_logical, plan(LOAD, replicas=8, devices=4).physical_to_logical
    )
    rows_of = placement.physical_to_logical  # each copy carries load / copies; device d has slots 4d..4d+3
    per_copy = LOAD[np.arange(2)[:, None], rows_of] / placement.copies[np.arange(2)[:, None], rows_of]
    after = per_copy.reshape(2, 4, 4).sum(-1)
    for layer in range(2):
        ratio_before = before[layer].max() / before[layer].mean()
        ratio_after = after[layer].max() / after[layer].mean()
        assert rows[str(layer)] == pytest.approx((ratio_before, ratio_after), abs=5e-4)
    overall = (before.max(1).sum() / before.mean(1).sum(), after.max(1).sum() / after.mean(1).sum())
    assert rows["all"] == pytest.approx(overall, abs=5e-4)
    assert rows["0"][1] < rows["0"][0] / 2  # the hot layer balanced


@pytest.mark.parametrize(
    "stats,extra,message",
    [
        ("missing.npz", [], "missing.npz: no such file"),
        ("load.csv", [], "expert stats files end in .npz or .json or .npy, not '.csv'"),
        ("flat.npy", [], "must be a numeric [layers, experts] array, got shape (8,)"),
        ("load.npy", ["--replicas", "3"], "8 experts + 3 replicas = 11 slots do not split over 4 devices"),
        ("load.npy", ["--out", "{tmp}/plan.txt"], "--out {tmp}/plan.txt: give a .json file"),
        ("load.npy", ["--groups", "3"], "8 experts do not split into 3 groups"),
    ],
)
def test_plan_errors_are_one_line_with_exit_code_2(tmp_path, capsys, stats, extra, message):
    np.save(tmp_path / "load.npy", LOAD)
    np.save(tmp_path / "flat.npy", LOAD[0])
    (tmp_path / "load.csv").write_text("1,2")
    extra = [a.format(tmp=tmp_path) for a in extra]
    args = ["experts", "plan", "--stats", str(tmp_path / stats), "--devices", "4"]
    args += extra if "--replicas" in extra else ["--replicas", "4", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message.format(tmp=tmp_path) in err and "\n" not in err, err


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_of_a_dump_a_plain_array_and_metrics(tmp_path):
    ledger = ExpertLedger(2, 8, window_steps=4)
    for k in range(3):
        ledger.record(LOAD + k, 1000)
    save_expert_load(tmp_path / "stats.npz", ledger.steps())
    np.save(tmp_path / "load.npy", LOAD)
    records = [{"step": s, "loss": 1.0, "moe_window_load_max_over_mean": [1.5, 1.2 + s / 10]} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    sizes = {}
    for name in ("stats.npz", "load.npy", "metrics.jsonl"):
        out = tmp_path / f"{name}.png"
        assert main(["experts", "plot", "--stats", str(tmp_path / name), "--out", str(out)]) == 0
        sizes[name] = _png_size(out)
    assert sizes["stats.npz"][0] > sizes["metrics.jsonl"][0]  # heat map and series side by side


def test_plot_of_metrics_without_expert_records_is_one_error_line(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    args = ["experts", "plot", "--stats", str(tmp_path / "metrics.jsonl"), "--out", str(tmp_path / "p.png")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "no moe_window_load_max_over_mean records" in err and "\n" not in err
