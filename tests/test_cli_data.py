"""`frontier-jax data prepare`: shards and a config that reads them; errors (a full disk
included) as one line, exit code 2."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from frontier_jax import cli
from frontier_jax.config import CONFIG_DIR, load_config
from frontier_jax.data import build_train_iterator, prepare, prepared
from tests.train.common import REPO, child_pids, end_processes, kill_9_and_wait_for, subprocess_env


def _config(tmp_path, n=40):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i} " * (i % 7 + 1)}) + "\n" for i in range(n)))
    config = tmp_path / "run.yaml"
    config.write_text(
        "include: [" + str(CONFIG_DIR / "model" / "toy.yaml") + "]\n"
        f"data:\n  sources: [{{name: docs, kind: jsonl, path: {docs}}}]\n"
        "train: {seq_len: 32, global_batch: 8}\n"
    )
    return str(config)


def test_prepare_writes_shards_and_a_config_that_gives_the_raw_batches(tmp_path, capsys):
    config, out = _config(tmp_path), tmp_path / "out"
    argv = ["data", "prepare", "--config", config, "--out", str(out), "--records-per-shard", "16"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'docs'}: 3 shards (3 written, 0 kept), 40 documents" in printed
    assert f"frontier-jax train --config {out / 'config.yaml'}" in printed
    raw, prepared = (load_config(c, ["data.shuffle=false"]) for c in (config, str(out / "config.yaml")))
    assert prepared.data.sources[0].kind == "prepared" and prepared.model == raw.model
    batches = [
        [next(it) for _ in range(5)]
        for it in (build_train_iterator(c.data, seq_len=32, global_batch=8) for c in (raw, prepared))
    ]
    for want, got in zip(*batches):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert cli.main(argv) == 0
    assert "3 shards (0 written, 3 kept)" in capsys.readouterr().out


def test_prepare_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["data", "prepare", "--config", "model/toy", "--out", out]) == 2  # embedded math
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.sources[1] ('math', kind='embedded_math') generates 2^31 records")
    assert "\n" not in err


def test_training_on_a_corrupt_shard_stops_before_training_naming_the_shard(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["data", "prepare", "--config", _config(tmp_path), "--out", str(out)]) == 0
    shard = out / "docs" / "shard-00000-of-00001.array_record"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(out / "config.yaml"), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: prepared shard {shard} is corrupt: checksum mismatch") and "\n" not in err
    assert not run.exists()  # nothing written


def _manifest_to_full_disk(directory, manifest):
    with open("/dev/full", "w") as f:  # every write fails with ENOSPC
        json.dump(manifest, f)


@pytest.mark.parametrize(
    "target,replacement,written",
    [
        (
            (prepare, "ArrayRecordWriter"),
            lambda path, options: ArrayRecordWriter("/dev/full", options),
            "docs/shard-00000-of-00003.array_record.tmp",
        ),
        ((prepared, "write_manifest"), _manifest_to_full_disk, "docs/manifest.json"),
    ],
    ids=["shard", "manifest"],
)
def test_a_full_disk_is_one_error_line_naming_the_file(
    tmp_path, capsys, monkeypatch, target, replacement, written
):
    """ENOSPC injected by writing to /dev/full in place of the shard or the manifest file."""
    monkeypatch.setattr(*target, replacement)
    config, out = _config(tmp_path), tmp_path / "out"
    assert (
        cli.main(["data", "prepare", "--config", config, "--out", str(out), "--records-per-shard", "16"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: data prepare: writing {out / written} failed (") and "No space left" in err
    assert "run the same command again" in err


def test_prepare_workers_end_within_seconds_of_a_kill_9_of_the_command(tmp_path):
    """`data prepare --workers 2` killed with SIGKILL while both workers write a shard: they are
    gone within a few seconds (they used to finish their shards, minutes of work, orphaned)."""
    config = tmp_path / "math.yaml"
    config.write_text(
        f"include: [{CONFIG_DIR / 'model' / 'toy.yaml'}]\ndata:\n  sources: [{{name: math, kind: embedded_math}}]\n"
    )
    out = tmp_path / "out"
    argv = ["data", "prepare", "--config", str(config), "--out", str(out), "--workers", "2"]
    argv += ["--max-records", "2000000", "--records-per-shard", "1000000"]  # ~1 min per shard
    proc = subprocess.Popen(
        [sys.executable, "-m", "frontier_jax", *argv],
        env=subprocess_env(devices=None),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while len(list(out.glob("math/*.tmp"))) < 2:  # both workers are writing
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        workers = child_pids(proc.pid)
        left = kill_9_and_wait_for(proc, workers)
        assert len(workers) >= 2 and not left, (workers, left)
    finally:
        end_processes(proc, workers)
