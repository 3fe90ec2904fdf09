"""Sources as grain MapDatasets of `Record`s, one record per document.

File formats (the fields read are those of the source's `format`, see `records.py`):
  jsonl         one JSON object per line.
  parquet       one row per record, the fields are columns (text: string or UTF-8
                binary; chat: a list of structs {role, content}).
  array_record  records are UTF-8 text (format text only), or JSON objects. A file
                holds one or the other, told by its first record: JSON when it
                starts with "{".
A file that holds no record at all is an error naming it; a record that cannot
be read becomes a `Record` with a `problem` (counted and skipped downstream).
A prepared source (kind prepared) is the directory of shards of `prepared.py`.

Paths are etils `epath` paths: local files, or `gs://` and other object stores where epath's
backend for them is installed (JSONL and Parquet files are read through it; ArrayRecord files
through array_record's own reader).
"""

from __future__ import annotations

import bisect
import functools
import glob
import threading

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from frontier_jax.data import chat_math, embedded, records
from frontier_jax.data.config import CHAT_MATH_KIND, PREPARED_KIND, RecordFormat, SourceConfig
from frontier_jax.data.prepared import PreparedSource
from frontier_jax.data.screen import DataError

_SCAN_CHUNK = 1 << 24


def _glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern`: the parts after its first wildcard matched under the
    directory before it (an epath glob, so also in object stores)."""
    parts = pattern.split("/")
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    directory = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    return sorted(str(p) for p in epath.Path(directory).glob("/".join(parts[first:])))


def _size(path: str) -> int:
    return epath.Path(path).stat().length


def resolve_paths(source: SourceConfig) -> list[str]:
    """Sorted files named by `source.path` (a file or a glob); error when there are none."""
    pattern = source.path
    paths = _glob(pattern) if glob.has_magic(pattern) else [pattern]
    missing = [p for p in paths if not epath.Path(p).is_file()]
    if not paths or missing:
        raise FileNotFoundError(
            f"data source {source.name!r}: path={pattern!r} matches no file"
            + (f" ({missing[0]!r} does not exist)" if missing else "")
            + ". Fix data.sources[].path."
        )
    return paths


def _empty_file_error(path: str, what: str) -> ValueError:
    return ValueError(f"{path} is empty ({what}): remove it from the source's path or fill it.")


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) byte offsets [n_lines] of the lines of `path`, newlines excluded."""
    size = _size(path)
    if size == 0:
        raise _empty_file_error(path, "0 bytes")
    newlines = []
    with epath.Path(path).open("rb") as f:
        offset = 0
        while chunk := f.read(_SCAN_CHUNK):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + offset)
            offset += len(chunk)
    ends = np.concatenate(newlines).astype(np.int64)
    if len(ends) == 0 or ends[-1] != size - 1:  # last line without a newline
        ends = np.append(ends, size)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return starts, ends


class JsonlSource:
    """Random access to the lines of one JSONL file (thread safe: one open file per thread)."""

    def __init__(self, path: str, source: SourceConfig):
        self._path = path
        self._source = source
        self._size = _size(path)
        self._starts, self._ends = _line_spans(path)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> records.Record:
        if getattr(self._local, "file", None) is None:
            self._local.file = epath.Path(self._path).open("rb")
        start, end = int(self._starts[index]), int(self._ends[index])
        self._local.file.seek(start)
        raw = self._local.file.read(end - start)
        if len(raw) < end - start:  # the file lost its end since its lines were found
            raise DataError(
                f"data source {self._source.name!r}: {self._path} shrank from {self._size} to "
                f"{_size(self._path)} bytes while it was read (line {index + 1} is gone): a source file "
                "must not change under a run; restore it, or train on the new file with --restart-data"
            )
        return records.from_json(f"{self._path}:{index + 1}", raw, self._source)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _local=threading.local())


class ParquetSource:
    """Random access to the rows (the source's field columns) of one Parquet file, a row group
    at a time."""

    def __init__(self, path: str, source: SourceConfig):
        if _size(path) == 0:
            raise _empty_file_error(path, "0 bytes")
        try:
            with epath.Path(path).open("rb") as f:
                file = pq.ParquetFile(f)
                metadata, columns = file.metadata, file.schema_arrow.names
        except pa.ArrowException as err:
            raise ValueError(
                f"{path} is not a Parquet file ({err}): fix data.sources[].path or .kind."
            ) from err
        for column in source.fields():
            if column not in columns:
                raise ValueError(
                    f"{path} has no column {column!r} (columns: {columns}): set the field of "
                    f"data.sources[].format={RecordFormat(source.format).value!r}."
                )
        sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        if sum(sizes) == 0:
            raise _empty_file_error(path, "0 rows")
        self._path = path
        self._source = source
        self._group_starts = np.cumsum([0] + sizes[:-1]).tolist()
        self._length = sum(sizes)
        self._cache = (-1, [])

    def __len__(self) -> int:
        return self._length

    def _row_group(self, group: int) -> list:
        cached_group, values = self._cache
        if cached_group != group:
            with epath.Path(self._path).open("rb") as f:
                table = pq.ParquetFile(f).read_row_group(group, columns=list(self._source.fields()))
            values = table.to_pylist()
            self._cache = (group, values)
        return values

    def __getitem__(self, index: int) -> records.Record:
        group = bisect.bisect_right(self._group_starts, index) - 1
        value = self._row_group(group)[index - self._group_starts[group]]
        return records.from_fields(f"{self._path}#{index}", value, self._source)


class ArrayRecordSource:
    """Random access to the records of one ArrayRecord file."""

    def __init__(self, path: str, source: SourceConfig):
        if _size(path) == 0:
            raise _empty_file_error(path, "0 bytes")
        self._data = grain.sources.ArrayRecordDataSource([path])
        if len(self._data) == 0:
            raise _empty_file_error(path, "0 records")
        self._path = path
        self._source = source
        self._json = self._data[0].lstrip().startswith(b"{")
        if not self._json and source.format != RecordFormat.text:
            raise ValueError(
                f"{path} holds plain-text records, but data.sources[].format="
                f"{RecordFormat(source.format).value!r} reads JSON objects: use format=text."
            )

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> records.Record:
        origin, raw = f"{self._path}#{index}", self._data[index]
        if self._json:
            return records.from_json(origin, raw, self._source)
        return records.from_bytes(origin, raw)


_FILE_SOURCES = {"jsonl": JsonlSource, "parquet": ParquetSource, "array_record": ArrayRecordSource}


def _text_record(name: str, index: int, text: str) -> records.Record:
    return records.Record(f"{name}#{index}", text=text)


def _chat_record(name: str, index: int, problem: chat_math.ChatProblem) -> records.Record:
    return records.Record(f"{name}#{index}", messages=problem.messages())


def source_records(source: SourceConfig, *, seed: int) -> grain.MapDataset:
    """MapDataset[Record] of one configured source (files concatenated in path order).

    `seed` drives the generated sources (embedded_math, embedded_chat_math).
    """
    if source.kind == PREPARED_KIND:
        return grain.MapDataset.source(PreparedSource(source.path))
    if source.kind in _FILE_SOURCES:
        reader = _FILE_SOURCES[source.kind]
        parts = [grain.MapDataset.source(reader(p, source)) for p in resolve_paths(source)]
        return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
    if source.kind == CHAT_MATH_KIND:
        problems = chat_math.train_dataset(seed, source.difficulty)
        return problems.map_with_index(functools.partial(_chat_record, source.name))
    texts = embedded.code_dataset() if source.kind == "embedded_code" else embedded.math_dataset(seed)
    return texts.map_with_index(functools.partial(_text_record, source.name))
