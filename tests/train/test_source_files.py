"""What the trainer says about its source files (frontier_jax/data/sources.py, stats.py):

* a JSONL file that lost lines while a run reads it is a `DataError` (exit 4) saying that the
  file shrank, with both sizes (its lost lines used to be counted and skipped as invalid JSON);
* every source's passes are counted (`data/<source>/epochs` in metrics.jsonl: records read over
  the records of one pass), and a source read 10, 100, ... times over is warned about once per
  power of ten (a 3-document source used to be re-read 127 times in 10 steps without a word).
"""

from __future__ import annotations

import json
import logging

import pytest

from frontier_jax.data import DataError, build_train_iterator, load_tokenizer
from frontier_jax.data.template import render_document
from frontier_jax.train.loop import train

from .common import read_metrics, tiny_config


def _jsonl(path, texts) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def _source(path, name: str = "docs") -> str:
    return f"data.sources=[{{name: {name}, kind: jsonl, path: {path}}}]"


def test_lines_lost_from_a_source_file_that_shrank_are_a_data_error_naming_both_sizes(tmp_path):
    path = tmp_path / "docs.jsonl"
    _jsonl(path, [f"document number {i} " * 5 for i in range(400)])
    size = path.stat().st_size
    cfg = tiny_config(_source(path), "data.shuffle=false")
    data = build_train_iterator(cfg.data, seq_len=32, global_batch=8)  # the file's lines are found here
    kept = path.read_bytes()[: size // 4]
    path.write_bytes(kept)  # (a file rewritten in place, e.g. by a job producing it)
    with pytest.raises(DataError) as err:
        for _ in range(100):
            next(data)
    assert str(err.value).startswith(
        f"data source 'docs': {path} shrank from {size} to {len(kept)} bytes while it was read (line "
    )
    assert "is gone): a source file must not change under a run" in str(err.value)


def test_epochs_are_logged_per_source_and_a_source_read_over_and_over_is_warned_about(tmp_path, caplog):
    texts = ["the first small document", "another small document", "and a third one"]
    path = _jsonl(tmp_path / "tiny.jsonl", texts)
    cfg = tiny_config(_source(path, "tiny"), "data.shuffle=false", "train.steps=10", "checkpoint.every=0")
    with caplog.at_level(logging.WARNING, logger="frontier_jax.data.stats"):
        history = train(cfg, tmp_path / "run", progress=False)
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in history] == [r["step"] for r in records] == list(range(1, 11))
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
    pass_tokens = sum(len(render_document(tokenizer, t)[0]) for t in texts)
    epochs = [r["data/tiny/epochs"] for r in records]
    for r, e in zip(records, epochs):
        assert r["data/tiny/documents"] == round(3 * e)  # records read over the 3 of one pass
        # the passes trained on, within the packer's buffer (16 rows of 32 tokens) of those read
        assert abs(e - r["data/tiny/tokens"] / pass_tokens) <= 16 * 32 / pass_tokens + 1
    assert epochs == sorted(epochs) and 10 <= epochs[-1] < 100  # ~38 passes in 10 steps
    warned = [m for m in caplog.messages if "has been read" in m]
    step = next(r["step"] for r, e in zip(records, epochs) if e >= 10)
    assert warned == [
        f"data source 'tiny' has been read {epochs[step - 1]:.0f} times over by step {step} (3 records per "
        "pass): it repeats its documents; add data to it or lower its weight"
    ]
