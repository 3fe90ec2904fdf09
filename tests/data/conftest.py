"""Shared helpers of the data tests: tiny files written into tmp_path."""

import json

import pytest

from frontier_jax.data import DataConfig, SourceConfig


@pytest.fixture
def write_jsonl(tmp_path):
    """write_jsonl(name, lines) -> path; each line is a JSON value to encode, or raw bytes."""

    def write(name, lines):
        path = tmp_path / name
        raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
        path.write_bytes(b"\n".join(raw) + b"\n")
        return str(path)

    return write


@pytest.fixture
def jsonl_config(write_jsonl):
    """jsonl_config(docs_by_source, weights=None, **data_fields) -> DataConfig over JSONL files."""

    def make(docs_by_source, weights=None, **fields):
        sources = [
            SourceConfig(
                name=name,
                kind="jsonl",
                weight=(weights or {}).get(name, 1.0),
                path=write_jsonl(f"{name}.jsonl", [{"text": d} for d in docs]),
            )
            for name, docs in docs_by_source.items()
        ]
        return DataConfig(sources=sources, **fields)

    return make
