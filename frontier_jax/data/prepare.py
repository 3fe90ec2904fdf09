"""`frontier-jax data prepare`: screen and tokenize a config's sources once into ArrayRecord shards.

prepare(cfg, out) writes <out>/<source>/ for every source of `cfg` (format: `prepared.py`),
then `prepared_sources(cfg, out)` are the same sources (names, weights) read from the shards.

Resumable: a shard is written to `<file>.tmp` and renamed when closed, then listed in the manifest
(itself written whole), so an interrupted run leaves only whole, listed shards.  A write that
fails (disk full, ...) is one OSError naming the file. Run again with the
same config and `out`: listed shards whose file and sha256 check are kept, every other shard (never
written, half-written, missing or corrupt) is written again. A directory prepared from another
source, tokenizer, screening or shard layout is refused, naming what differs.

Shards are independent (shard i = records [i R, (i + 1) R) of the source), so with workers > 1
they are written by that many processes, in any order; the result is the same.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import os
from typing import Any

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from frontier_jax.data import prepared, stats
from frontier_jax.data.config import PREPARED_KIND, DataConfig, RecordFormat, SourceConfig
from frontier_jax.data.parent_watch import exit_with_parent
from frontier_jax.data.records import Rendered
from frontier_jax.data.screen import screen
from frontier_jax.data.sources import source_records
from frontier_jax.data.template import ChatTemplate, render_document
from frontier_jax.data.tokenizer import Tokenizer, load_tokenizer, tokenizer_identity

RECORDS_PER_SHARD = 10_000
GENERATED_KINDS = (
    "embedded_math",
    "embedded_chat_math",
)  # 2^31 generated records: prepare a prefix (max_records)


@dataclasses.dataclass
class PreparedSourceResult:
    """What `prepare` did for one source: its manifest, the shards written now (the others were
    kept from an earlier run) and its directory."""

    directory: str
    manifest: dict[str, Any]
    written: list[int]


def _write_failed(path: str, err: Exception) -> OSError:
    """A failed write (disk full, directory gone, ...) as one line naming the file and the fix."""
    return OSError(
        f"data prepare: writing {path} failed ({' '.join(str(err).split())}): free disk space or fix the "
        "directory, then run the same command again (finished shards are kept)"
    )


class _ShardFile:
    """An ArrayRecordWriter whose failures are `_write_failed` OSErrors naming the file (the
    library reports a full disk as a RuntimeError)."""

    def __init__(self, path: str):
        self.path = path
        self._writer = self._guarded(ArrayRecordWriter, path, "group_size:1")

    def _guarded(self, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, OSError) as err:
            raise _write_failed(self.path, err) from None

    def write(self, record: bytes) -> None:
        self._guarded(self._writer.write, record)

    def close(self) -> None:
        self._guarded(self._writer.close)


def _write_manifest(directory: str, manifest: dict[str, Any]) -> None:
    try:
        prepared.write_manifest(directory, manifest)
    except OSError as err:
        raise _write_failed(os.path.join(directory, prepared.MANIFEST), err) from None


class _ShardWriter:
    """Writes shard (index, start, end) of one source; sent once to each worker process."""

    def __init__(self, cfg: DataConfig, source: SourceConfig, tokenizer: Tokenizer, directory: str, header):
        self._cfg, self._source, self._tokenizer = cfg, source, tokenizer
        self._directory, self._num_shards = directory, header["num_shards"]
        self._dtype = np.dtype(header["dtype"])
        self._limits = {"min_chars": cfg.min_document_chars, "max_chars": cfg.max_document_chars}
        self._records = None
        self._template = ChatTemplate.of_tokenizer(cfg.tokenizer) if source.renders_chat else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_records": None}

    def __call__(self, index: int, start: int, end: int) -> dict[str, Any]:
        if self._records is None:
            self._records = source_records(self._source, seed=self._cfg.seed)
        name = prepared.shard_name(index, self._num_shards)
        path = os.path.join(self._directory, name)
        counts, documents, tokens = stats.zero_counts(), 0, 0
        writer = _ShardFile(path + ".tmp")
        try:
            for i in range(start, end):
                pieces, counters = screen(self._records[i], **self._limits)
                for counter in counters:
                    counts[counter] += 1
                for piece in pieces:
                    rendered = Rendered(*render_document(self._tokenizer, piece, self._template))
                    writer.write(prepared.encode_document(rendered, self._dtype))
                    documents, tokens = documents + 1, tokens + len(rendered.ids)
        finally:
            writer.close()
        digest = prepared.file_sha256(path + ".tmp")
        os.replace(path + ".tmp", path)
        return {
            "index": index,
            "file": name,
            "records": [start, end],
            "documents": documents,
            "tokens": tokens,
            "counts": {k: v for k, v in counts.items() if v},
            "bytes": os.path.getsize(path),
            "sha256": digest,
        }


_WORKER: _ShardWriter | None = None


def _init_worker(writer: _ShardWriter, parent_pid: int) -> None:
    global _WORKER
    _WORKER = writer
    exit_with_parent(parent_pid)  # a parent killed with -9 leaves no worker behind


def _run_in_worker(index: int, start: int, end: int) -> dict[str, Any]:
    return _WORKER(index, start, end)


def _header(cfg: DataConfig, source: SourceConfig, tokenizer: Tokenizer, num_records: int, per_shard: int):
    identity = tokenizer_identity(tokenizer)
    return {
        "format_version": prepared.FORMAT_VERSION,
        # what the shards are made of (the weight belongs to a mixture, not to the shards)
        "source": {
            **{k: v for k, v in dataclasses.asdict(source).items() if k != "weight"},
            "format": RecordFormat(source.format).value,
        },
        "screen": prepared.screen_limits(cfg),
        "tokenizer": identity,
        "dtype": prepared.ids_dtype(identity["vocab_size"]).str,
        "records": num_records,
        "records_per_shard": per_shard,
        "num_shards": math.ceil(num_records / per_shard),
    }


def _kept_shards(directory: str, header: dict[str, Any]) -> list[dict[str, Any]]:
    """The intact shards of an earlier run into `directory`; refuses another preparation's directory."""
    earlier = prepared.read_manifest(directory)
    if earlier is None:
        return []
    for key, value in header.items():
        if earlier.get(key) != value:
            raise prepared.PreparedError(
                f"--out {directory!r} holds a preparation with another {key} ({earlier.get(key)!r}, now "
                f"{value!r}): give another --out directory, or delete this one."
            )
    return [s for s in earlier["shards"] if prepared.shard_problem(directory, s) is None]


def prepare_source(
    cfg: DataConfig,
    source: SourceConfig,
    directory: str,
    *,
    tokenizer: Tokenizer,
    records_per_shard: int = RECORDS_PER_SHARD,
    max_records: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> PreparedSourceResult:
    """Writes the missing shards of one source into `directory` (see the module docstring)."""
    records = source_records(source, seed=cfg.seed)
    num_records = len(records) if max_records is None else min(len(records), max_records)
    header = _header(cfg, source, tokenizer, num_records, records_per_shard)
    os.makedirs(directory, exist_ok=True)
    kept = {s["index"]: s for s in _kept_shards(directory, header)}
    pending = [
        (i, i * records_per_shard, min((i + 1) * records_per_shard, num_records))
        for i in range(header["num_shards"])
        if i not in kept
    ]
    shards = dict(kept)

    def finish(shard: dict[str, Any]) -> None:
        shards[shard["index"]] = shard
        _write_manifest(directory, {**header, "shards": [shards[i] for i in sorted(shards)]})
        bar.update(shard["records"][1] - shard["records"][0])

    writer = _ShardWriter(cfg, source, tokenizer, directory, header)
    done = sum(s["records"][1] - s["records"][0] for s in kept.values())
    with tqdm(
        total=num_records, initial=done, desc=f"prepare {source.name}", unit="record", disable=not progress
    ) as bar:
        _write_manifest(directory, {**header, "shards": [shards[i] for i in sorted(shards)]})
        if workers > 1 and len(pending) > 1:
            with concurrent.futures.ProcessPoolExecutor(
                min(workers, len(pending)),
                mp_context=multiprocessing.get_context("spawn"),  # forking a threaded process can hang
                initializer=_init_worker,
                initargs=(writer, os.getpid()),
            ) as pool:
                for future in concurrent.futures.as_completed(
                    [pool.submit(_run_in_worker, *p) for p in pending]
                ):
                    finish(future.result())
        else:
            for shard in pending:
                finish(writer(*shard))
    manifest = {**header, "shards": [shards[i] for i in sorted(shards)]}
    if not sum(s["documents"] for s in manifest["shards"]):
        counts = stats.zero_counts()
        for shard in manifest["shards"]:
            for name, value in shard["counts"].items():
                counts[name] += value
        raise prepared.PreparedError(
            f"data source {source.name!r} gave no document in its {num_records} records (counts: "
            + ", ".join(f"{k}={v}" for k, v in counts.items() if v)
            + "): check its path / text_field, or drop it from data.sources."
        )
    return PreparedSourceResult(directory, manifest, [p[0] for p in pending])


def validate_prepare_args(
    cfg: DataConfig, *, records_per_shard: int, max_records: int | None, workers: int
) -> None:
    """Raises ValueError naming the argument or field and the fix, before anything is read."""
    cfg.validate()
    if records_per_shard < 1:
        raise ValueError(f"--records-per-shard {records_per_shard}: must be >= 1.")
    if max_records is not None and max_records < 1:
        raise ValueError(f"--max-records {max_records}: must be >= 1 (or left out: every record).")
    if workers < 1:
        raise ValueError(f"--workers {workers}: must be >= 1.")
    for i, source in enumerate(cfg.sources):
        if source.kind == PREPARED_KIND:
            raise ValueError(
                f"data.sources[{i}] ({source.name!r}) is already prepared (kind={PREPARED_KIND!r}): "
                "prepare the config it was made from."
            )
        if source.fim_rate:
            raise ValueError(
                f"data.sources[{i}].fim_rate={source.fim_rate!r} ({source.name!r}): fill-in-the-middle is "
                "drawn on the text while training and shards hold token ids; prepare with fim_rate=0, or "
                "train this source from its raw files for FIM."
            )
        if source.kind in GENERATED_KINDS and max_records is None:
            raise ValueError(
                f"data.sources[{i}] ({source.name!r}, kind={source.kind!r}) generates 2^31 records: give "
                "--max-records N to prepare its first N."
            )


def prepare(
    cfg: DataConfig,
    out: str,
    *,
    records_per_shard: int = RECORDS_PER_SHARD,
    max_records: int | None = None,
    workers: int = 1,
    progress: bool = True,
) -> list[PreparedSourceResult]:
    """Prepares every source of `cfg` into `out`/<source name>; `max_records` caps the records
    read from each source (its first ones)."""
    validate_prepare_args(cfg, records_per_shard=records_per_shard, max_records=max_records, workers=workers)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.special_tokens)
    return [
        prepare_source(
            cfg,
            source,
            os.path.join(out, source.name),
            tokenizer=tokenizer,
            records_per_shard=records_per_shard,
            max_records=max_records,
            workers=workers,
            progress=progress,
        )
        for source in cfg.sources
    ]


def prepared_sources(cfg: DataConfig, out: str) -> list[SourceConfig]:
    """The sources of `cfg` (same names and weights) read from their shards under `out`."""
    return [
        SourceConfig(name=s.name, kind=PREPARED_KIND, path=os.path.join(out, s.name), weight=s.weight)
        for s in cfg.sources
    ]
