"""The multi-host code path of the training loop, on one machine.

Two processes with 4 fake CPU devices each join through `jax.distributed` (coordinator on a
free local port, gloo collectives) and run `frontier_jax.train.loop.train` on one 8-device
mesh with 8-way expert parallelism (process p holds experts 4p..4p+3 and batch rows 4p..4p+3),
so the experts' all-to-all and the gradient reductions cross processes.  Each process feeds
only its own rows of the global batch (`make_array_from_process_local_data`) and writes its
own shards and data-iterator state into the shared checkpoint.  A single process with 8
devices runs the same config.  Same model, same data, same global batch; only the device
placement and the collectives differ, so every logged loss agrees to fp32 rounding: relative
tolerance 1e-5 (fp32 epsilon 1.2e-7 times the ~100-fold growth of summation-order differences
over a few steps); the final checkpoints' parameters to 1e-5 relative + 1e-7 absolute.

The DCN form of a multi-host layout (data 2 x expert 4 with mesh.dcn.data=2: the data axis
across processes, built with `create_hybrid_device_mesh`) is checked on its own, without
training.  So is the loop's batch assembly on 2 processes x 2 devices for layouts that split the
batch across processes, replicate it across them (tensor spanning hosts) or interleave the
processes' rows: every device must hold exactly its block of the single-process global batch.
And the data iterator saved by 2 processes resumes in 1, and the one saved by 1 resumes in 2.

Speed (2 CPU cores): the three processes run at once and inherit the cheap-compile XLA flags
of tests/conftest.py (only the device count is replaced).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from frontier_jax.config import load_config
from frontier_jax.data import build_train_iterator
from frontier_jax.train.step import Trainer

from .multihost_worker import restore_data, save_data

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 300
RTOL = 1e-5

OVERRIDES = [  # one MoE layer (MLA, router with bias update, 8 experts, shared expert)
    "model.vocab_size=272",
    "model.hidden_size=32",
    "model.num_layers=1",
    "model.first_k_dense=0",
    "model.num_heads=2",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "model.n_routed_experts=8",
    "model.n_shared_experts=1",
    "model.num_experts_per_tok=2",
    "model.moe_ffn_dim=16",
    "model.n_group=2",
    "model.topk_group=1",
    "model.mtp_depth=0",
    "train.seq_len=32",
    "train.global_batch=8",
    "train.steps=3",
    "train.warmup_steps=1",
    "checkpoint.every=3",
    "mesh.data=1",
    "mesh.expert=8",
]
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
COMPARED = ("loss", "ce_loss", "balance_loss", "grad_norm", "lr", "tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _start(
    mode: str,
    log: Path,
    run_dir: Path,
    process_id: int,
    processes: int,
    port: int,
    devices: int,
    overrides: list[str],
) -> subprocess.Popen:
    args = [
        sys.executable,
        str(WORKER),
        mode,
        str(run_dir),
        str(process_id),
        str(processes),
        str(port),
        *overrides,
    ]
    return subprocess.Popen(args, env=_env(devices), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Waits for all; on a failure or the timeout, ends the others and fails with the logs."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = {name: p.poll() for name, p in procs.items()}
        if all(code == 0 for code in codes.values()):
            return
        if any(code not in (None, 0) for code in codes.values()):
            break
        time.sleep(0.5)
    for p in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
    report = "\n".join(
        f"--- {name} (exit {p.returncode}):\n{logs[name].read_text()[-3000:]}" for name, p in procs.items()
    )
    raise AssertionError(f"a training process failed or exceeded {TIMEOUT_S} s\n{report}")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _restored_params(run_dir: Path, step: int):
    """The checkpoint's parameters on this process's first device (state item only: the data
    item holds one iterator state per writing process)."""
    trainer = Trainer(load_config("model/toy", OVERRIDES))
    first = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=first),
        jax.eval_shape(lambda: trainer.init(0)),
    )
    with ocp.CheckpointManager(run_dir / "checkpoints") as manager:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state.params


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    port = _free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("single", "process0", "process1")}
    procs = {"single": _start("train", logs["single"], single, 0, 1, port, 8, OVERRIDES)}
    for i in range(2):
        procs[f"process{i}"] = _start("train", logs[f"process{i}"], multi, i, 2, port, 4, OVERRIDES)
    _wait(procs, logs)
    for i in range(2):
        assert f"process {i}/2: 4 local of 8 devices, done" in logs[f"process{i}"].read_text()

    ref, got = _metrics(single), _metrics(multi)  # metrics.jsonl: written by process 0 only
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for r, g in zip(ref, got):
        for key in COMPARED:
            np.testing.assert_allclose(g[key], r[key], rtol=RTOL, err_msg=f"step {r['step']} {key}")
    assert got[-1]["loss"] < got[0]["loss"]

    data_states = sorted(p.name for p in (multi / "checkpoints" / "3" / "data").glob("process_*.json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]  # one iterator state per process
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-7),
        _restored_params(multi, 3),
        _restored_params(single, 3),
    )


@pytest.mark.slow
def test_dcn_axis_spans_the_processes(tmp_path):
    """mesh.dcn.data=2 over two processes: each process's 4 devices form one row of the data
    axis (data index = process index) and span the whole ICI expert axis."""
    port = _free_port()
    overrides = ["mesh.data=2", "mesh.expert=4", "mesh.dcn.data=2"]
    logs = {f"process{i}": tmp_path / f"process{i}.log" for i in range(2)}
    procs = {
        name: _start("mesh", log, tmp_path, i, 2, port, 4, overrides)
        for i, (name, log) in enumerate(logs.items())
    }
    _wait(procs, logs)
    for i, log in enumerate(logs.values()):
        line = next(line for line in log.read_text().splitlines() if line.startswith("{"))
        coords = json.loads(line)["coords"]
        assert {c["data"] for c in coords} == {i}
        assert sorted(c["expert"] for c in coords) == [0, 1, 2, 3]


# 2 processes x 2 devices; the batch rule splits rows over (data, fsdp, expert), not tensor
LAYOUTS = {
    "data across processes": ["mesh.data=4", "mesh.expert=1"],
    "data across, tensor within": ["mesh.data=2", "mesh.tensor=2", "mesh.dcn.data=2", "mesh.expert=1"],
    "tensor across (batch replicated over processes)": [
        "mesh.data=2",
        "mesh.tensor=2",
        "mesh.dcn.tensor=2",
        "mesh.expert=1",
    ],
    "expert across, data within (rows interleaved)": ["mesh.data=2", "mesh.expert=2", "mesh.dcn.expert=2"],
}


def _run_two(mode: str, run_dir: Path, overrides: list[str], devices: int = 2) -> None:
    port = _free_port()
    logs = {f"process{i}": run_dir / f"{mode}_process{i}.log" for i in range(2)}
    _wait(
        {
            name: _start(mode, log, run_dir, i, 2, port, devices, overrides)
            for i, (name, log) in enumerate(logs.items())
        },
        logs,
    )


def _single_process_batches(overrides: list[str], n: int) -> list[dict]:
    cfg = load_config("model/toy", overrides)
    it = build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch)
    return [next(it) for _ in range(n)]


def test_each_device_gets_its_block_of_the_global_batch_in_every_layout(tmp_path):
    """Before: each process fed rows [pB/2, (p+1)B/2) as its local data, so with tensor across
    processes the global batch had B/2 rows and differed between the processes' replicas."""
    base = [o for o in OVERRIDES if not o.startswith("mesh.")] + ["train.seq_len=16"]
    (tmp_path / "layouts.json").write_text(json.dumps(list(LAYOUTS.values())))
    _run_two("batch", tmp_path, base)
    want = _single_process_batches(base, 1)[0]
    rows = want["input_ids"].shape[0]
    for n, name in enumerate(LAYOUTS):
        covered = {p: set() for p in range(2)}
        for p in range(2):
            got = np.load(tmp_path / f"batch_{n}_{p}.npz")
            for key in BATCH_KEYS:
                assert tuple(got[f"{key}_shape"]) == want[key].shape, (name, key)
                for shard in range(2):  # 2 local devices
                    (r, c), value = got[f"{key}_{shard}_start"], got[f"{key}_{shard}_value"]
                    np.testing.assert_array_equal(
                        value,
                        want[key][r : r + len(value), c : c + value.shape[1]],
                        err_msg=f"{name}: process {p} shard {shard} {key}",
                    )
                    covered[p].update(range(r, r + len(value)))
        assert covered[0] | covered[1] == set(range(rows)), name
        if name.startswith("tensor across"):
            assert covered[0] == covered[1] == set(range(rows)), name


DATA_OVERRIDES = ["train.seq_len=32", "train.global_batch=4", "data.max_document_chars=100"]


def test_data_iterator_saved_by_two_processes_resumes_in_one(tmp_path):
    (tmp_path / "steps.txt").write_text("3")
    _run_two("data_save", tmp_path, DATA_OVERRIDES)
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "3" / "data").glob("process_*.json")) == [
        "process_0-of-2.json",
        "process_1-of-2.json",
    ]
    want = _single_process_batches(DATA_OVERRIDES, 4)[3]
    got = next(restore_data(load_config("model/toy", DATA_OVERRIDES), tmp_path))
    for key in BATCH_KEYS:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_data_iterator_saved_by_one_process_resumes_in_two(tmp_path):
    save_data(load_config("model/toy", DATA_OVERRIDES), tmp_path, 3)
    _run_two("data_next", tmp_path, DATA_OVERRIDES)
    want = _single_process_batches(DATA_OVERRIDES, 4)[3]
    for p in range(2):
        got = np.load(tmp_path / f"next_{p}.npz")
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"process {p} {key}")
