"""Held-out documents for evaluation: the training source kinds, read in file order.

`--data path/to/file.jsonl` (or .parquet / .array_record) becomes a source of that kind with
the default field names.  Records with a problem (bad JSON, missing field, ...) and empty texts
are skipped and counted; a source without any document is an error naming it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from frontier_jax.data.config import SourceConfig
from frontier_jax.data.sources import source_records
from frontier_jax.data.template import Document

_SUFFIX_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "array_record"}


def source_from_path(path: str) -> SourceConfig:
    """A text source for a data file named on the command line (kind from its suffix)."""
    kind = _SUFFIX_KINDS.get(Path(path).suffix)
    if kind is None:
        raise ValueError(
            f"--data {path}: unknown file type; use a .jsonl, .parquet or .array_record file "
            "with a 'text' field"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    return SourceConfig(name=Path(path).stem, kind=kind, path=path)


@dataclasses.dataclass(frozen=True)
class EvalDocuments:
    name: str
    documents: list[Document]
    skipped: int  # records without a usable document


def read_documents(source: SourceConfig, *, max_documents: int, seed: int) -> EvalDocuments:
    """The first `max_documents` (0 = all) usable documents of `source`, in order."""
    records = source_records(source, seed=seed)
    documents, skipped = [], 0
    for index in range(len(records)):
        if max_documents and len(documents) >= max_documents:
            break
        record = records[index]
        if record.problem is not None or (record.text is not None and not record.text.strip()):
            skipped += 1
        else:
            documents.append(record.text if record.text is not None else record.messages)
    if not documents:
        raise ValueError(
            f"eval data source {source.name!r} ({source.path or source.kind}) holds no document "
            f"({skipped} records skipped): give a file with non-empty '{source.text_field}' fields"
        )
    return EvalDocuments(source.name, documents, skipped)
