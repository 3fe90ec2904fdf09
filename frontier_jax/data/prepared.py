"""Prepared sources: documents screened and rendered once, stored in ArrayRecord shards.

`frontier-jax data prepare` (`prepare.py`) writes one directory per source of a config:

  <out>/<source>/manifest.json
  <out>/<source>/shard-00000-of-00004.array_record, ...

Shard i holds the documents of the source's records [i R, min((i + 1) R, N)) in file order
(N records, R = records_per_shard), screened as the raw pipeline screens them (`screen.py`: bad
records skipped, overlong texts split) and rendered by the chat template (`template.py`), one
ArrayRecord record per document of n ids:

  record = ids as `dtype` [n] (little-endian) ++ train flags as uint8 [n]      (n = bytes / (itemsize + 1))

with dtype uint16 when the tokenizer has at most 2^16 ids, else uint32.

manifest.json:
  format_version  FORMAT_VERSION
  source          the SourceConfig it was prepared from (a dict)
  screen          {"min_document_chars", "max_document_chars"} it was screened with
  tokenizer       `tokenizer.tokenizer_identity`: origin, vocab_size, special_ids, sha256 of its JSON
  dtype, records (N), records_per_shard (R), num_shards (ceil(N / R))
  shards          the written shards in index order: {index, file, records: [start, end], documents,
                  tokens (ids, bos / eos included), counts (screen counters), bytes, sha256}
The preparation is complete when every one of the num_shards shards is listed.

A source of kind prepared (path: <out>/<source>) reads the documents of all its shards in order
through one grain ArrayRecordDataSource (random access across shards); the pipeline shuffles it
globally like any source. `check_prepared` runs before training reads anything: a missing or
incomplete manifest, a missing shard, a shard whose sha256 differs from the manifest's (corrupt),
another tokenizer or other screening limits than the training config's raise `PreparedError`
naming the directory or file and the fix; nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import grain
import numpy as np
from etils import epath
from tqdm import tqdm

from frontier_jax.data import records
from frontier_jax.data.config import PREPARED_KIND, DataConfig
from frontier_jax.data.tokenizer import Tokenizer, check_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_VERIFY_BAR_BYTES = 1 << 28  # a progress bar when verifying more than this


class PreparedError(ValueError):
    """A prepared source that cannot be read as it is (missing, incomplete, corrupt, mismatched)."""


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}.array_record"


def ids_dtype(vocab_size: int) -> np.dtype:
    """The narrowest stored id type: uint16 up to 2^16 ids, else uint32 (little-endian)."""
    return np.dtype("<u2" if vocab_size <= 1 << 16 else "<u4")


def encode_document(document: records.Rendered, dtype: np.dtype) -> bytes:
    """One shard record: ids as `dtype` [n] then train as uint8 [n]."""
    return document.ids.astype(dtype).tobytes() + document.train.astype(np.uint8).tobytes()


def decode_document(raw: bytes, dtype: np.dtype) -> records.Rendered:
    """Inverse of `encode_document`: ids int32 [n], train bool [n]."""
    n = len(raw) // (dtype.itemsize + 1)
    ids = np.frombuffer(raw, dtype, count=n).astype(np.int32)
    train = np.frombuffer(raw, np.uint8, count=n, offset=n * dtype.itemsize).astype(bool)
    return records.Rendered(ids, train)


def screen_limits(cfg: DataConfig) -> dict[str, int]:
    return {"min_document_chars": cfg.min_document_chars, "max_document_chars": cfg.max_document_chars}


def file_sha256(path: epath.PathLike) -> str:
    """The sha256 (hex) of a file's bytes (local, or an object store's through epath)."""
    with epath.Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def is_complete(manifest: dict[str, Any]) -> bool:
    return len(manifest["shards"]) == manifest["num_shards"]


def write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    """Writes manifest.json whole (a temporary file renamed over it)."""
    path = os.path.join(directory, MANIFEST)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    os.replace(path + ".tmp", path)


def read_manifest(directory: str) -> dict[str, Any] | None:
    """The manifest of `directory`, None when it has none."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PreparedError(f"{path} is not valid JSON ({err}): prepare the source again.") from err
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PreparedError(
            f"{path} has format_version={manifest.get('format_version')!r}, this version reads "
            f"{FORMAT_VERSION}: prepare the source again."
        )
    return manifest


def load_manifest(directory: str) -> dict[str, Any]:
    """The manifest of a completely prepared source directory, else `PreparedError`."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise PreparedError(
            f"prepared source {directory!r} has no {MANIFEST}: path must be a directory written by "
            "frontier-jax data prepare (--out DIR writes DIR/<source name>)."
        )
    if not is_complete(manifest):
        raise PreparedError(
            f"prepared source {directory!r} is incomplete ({len(manifest['shards'])} of "
            f"{manifest['num_shards']} shards written): run frontier-jax data prepare again with the "
            "same config and --out to finish it."
        )
    return manifest


def shard_problem(directory: str, shard: dict[str, Any]) -> str | None:
    """Why a listed shard cannot be used ("missing", a size or checksum mismatch), None when intact."""
    path = os.path.join(directory, shard["file"])
    if not os.path.isfile(path):
        return "missing"
    size = os.path.getsize(path)
    if size != shard["bytes"]:
        return f"corrupt: {size} bytes, the manifest says {shard['bytes']}"
    digest = file_sha256(path)
    if digest != shard["sha256"]:
        return f"corrupt: checksum mismatch, sha256 {digest[:12]}..., the manifest says {shard['sha256'][:12]}..."
    return None


def verify_shards(directory: str, manifest: dict[str, Any]) -> None:
    """Raises `PreparedError` naming the first missing or corrupt shard."""
    shards = manifest["shards"]
    total = sum(s["bytes"] for s in shards)
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"verify {directory}", disable=total < _VERIFY_BAR_BYTES
    ) as bar:
        for shard in shards:
            problem = shard_problem(directory, shard)
            if problem is not None:
                raise PreparedError(
                    f"prepared shard {os.path.join(directory, shard['file'])} is {problem}: run "
                    "frontier-jax data prepare again with the config and --out it was made with to rewrite it."
                )
            bar.update(shard["bytes"])


def check_prepared(cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """Every prepared source of `cfg`: complete, intact, same tokenizer and screening; else `PreparedError`."""
    for i, source in enumerate(cfg.sources):
        if source.kind != PREPARED_KIND:
            continue
        where = f"data.sources[{i}] ({source.name!r}, path={source.path!r})"
        manifest = load_manifest(source.path)
        check_tokenizer(
            manifest["tokenizer"],
            tokenizer,
            f"{where} was prepared",
            "train with the tokenizer it was prepared with, or prepare it again with this one.",
            PreparedError,
        )
        for field, value in screen_limits(cfg).items():
            if manifest["screen"][field] != value:
                raise PreparedError(
                    f"{where} was screened with data.{field}={manifest['screen'][field]}, this config "
                    f"has data.{field}={value}: set it to {manifest['screen'][field]} or prepare again."
                )
        verify_shards(source.path, manifest)


class PreparedSource:
    """Random access to the documents of all shards of a prepared source, in shard order: Records
    with `rendered` set."""

    def __init__(self, directory: str):
        manifest = load_manifest(directory)
        files = [os.path.join(directory, s["file"]) for s in manifest["shards"] if s["documents"]]
        if not files:
            raise PreparedError(f"prepared source {directory!r} holds no document: prepare another source.")
        self._directory = directory
        self._dtype = np.dtype(manifest["dtype"])
        self._data = grain.sources.ArrayRecordDataSource(files)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> records.Record:
        rendered = decode_document(self._data[index], self._dtype)
        return records.Record(f"{self._directory}#{index}", rendered=rendered)
