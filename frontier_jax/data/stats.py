"""Per-source counts of accepted, skipped and split documents.

The counts live inside the iterator state (under `STATS_KEY`, one entry per
source and per grain worker), so they are exact with any `worker_count`, they
are saved with every checkpoint and they continue after a resume. Being part of
the restorable position, they trail the newest batch by the few records still
held in the packer's buffer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from frontier_jax.data import records

STATS_KEY = "frontier_data_stats"
DOCUMENTS = "documents"  # accepted documents (before splitting)
EMPTY = "empty"  # skipped: only whitespace
TOO_SHORT = "too_short"  # skipped: fewer than data.min_document_chars characters
SPLIT_OVERLONG = "split_overlong"  # accepted, split: over data.max_document_chars
SKIPPED = (
    records.INVALID_UTF8,
    records.INVALID_JSON,
    records.MISSING_FIELD,
    records.WRONG_TYPE,
    EMPTY,
    TOO_SHORT,
)
COUNTERS = (DOCUMENTS, SPLIT_OVERLONG) + SKIPPED


def zero_counts() -> dict[str, int]:
    """A fresh counter of every kind in `COUNTERS`."""
    return {name: 0 for name in COUNTERS}


@dataclasses.dataclass
class DataStats:
    """Counts per source: `counts[source][counter]`, counter in `COUNTERS`."""

    counts: dict[str, dict[str, int]]

    @classmethod
    def from_state(cls, state: Any) -> DataStats:
        """Sums the counts found anywhere in an iterator state (all workers, all sources)."""
        counts: dict[str, dict[str, int]] = {}
        pending = [state]
        while pending:
            node = pending.pop()
            if isinstance(node, dict):
                if STATS_KEY in node:
                    entry = node[STATS_KEY]
                    total = counts.setdefault(entry["source"], zero_counts())
                    for name, value in entry["counts"].items():
                        total[name] += int(value)
                pending.extend(node.values())
            elif isinstance(node, (list, tuple)):
                pending.extend(node)
        return cls(counts)

    def skipped(self, source: str) -> int:
        """Documents of `source` skipped for any reason."""
        return sum(self.counts[source][name] for name in SKIPPED)

    def as_metrics(self, prefix: str = "data") -> dict[str, int]:
        """Flat {"data/<source>/<counter>": n} for a metrics logger."""
        return {
            f"{prefix}/{source}/{name}": value
            for source, per_source in sorted(self.counts.items())
            for name, value in per_source.items()
        }
