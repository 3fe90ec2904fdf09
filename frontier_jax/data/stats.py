"""Per-source counts of accepted, skipped and split documents, and of the tokens trained on.

The document counts live inside the iterator state (under `STATS_KEY`, one entry per
source and per grain worker), so they are exact with any `worker_count`, they
are saved with every checkpoint and they continue after a resume. Being part of
the restorable position, they trail the newest batch by the records still held in
the shuffle window and the packer's buffer.  The token counts (under `MIXTURE_KEY`, written
by the batch iterator) are those of the batches yielded so far: the real tokens
(segment_ids > 0) of each source, next to the share of them the mixture schedule asked for.

Epochs: a source's records read (accepted or skipped) over the records of one pass over it,
    epochs = (documents + skipped) / records_per_epoch,
so 2.5 is the middle of its third pass; `warn_rereads` warns when a source is read over and over.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from frontier_jax.data import records

STATS_KEY = "frontier_data_stats"
MIXTURE_KEY = "frontier_data_mixture"
DOCUMENTS = "documents"  # accepted documents (before splitting)
EMPTY = "empty"  # skipped: only whitespace
TOO_SHORT = "too_short"  # skipped: fewer than data.min_document_chars characters
SPLIT_OVERLONG = "split_overlong"  # accepted, split: over data.max_document_chars
SKIPPED = (
    records.INVALID_UTF8,
    records.INVALID_JSON,
    records.MISSING_FIELD,
    records.WRONG_TYPE,
    records.EMPTY_CONTENT,
    records.NO_ASSISTANT,
    EMPTY,
    TOO_SHORT,
)
COUNTERS = (DOCUMENTS, SPLIT_OVERLONG) + SKIPPED
REREAD_WARN_EPOCHS = 10  # warn when a source has been read this many times over (then x10, x100 ...)
_log = logging.getLogger(__name__)


def zero_counts() -> dict[str, int]:
    """A fresh counter of every kind in `COUNTERS`."""
    return {name: 0 for name in COUNTERS}


@dataclasses.dataclass
class DataStats:
    """Counts per source: `counts[source][counter]`, counter in `COUNTERS`; `tokens[source]`
    trained on and `target_share[source]`, the share of them the schedule asked for."""

    counts: dict[str, dict[str, int]]
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)
    target_share: dict[str, float] = dataclasses.field(default_factory=dict)
    records_per_epoch: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_state(cls, state: Any) -> DataStats:
        """Sums the counts found anywhere in an iterator state (all workers, all sources)."""
        counts: dict[str, dict[str, int]] = {}
        records_per_epoch: dict[str, int] = {}
        mixture = {"tokens": {}, "target_share": {}}
        pending = [state]
        while pending:
            node = pending.pop()
            if isinstance(node, dict):
                if STATS_KEY in node:
                    entry = node[STATS_KEY]
                    total = counts.setdefault(entry["source"], zero_counts())
                    for name, value in entry["counts"].items():
                        total[name] += int(value)
                    if "records_per_epoch" in entry:  # (states saved before epochs were counted lack it)
                        records_per_epoch[entry["source"]] = int(entry["records_per_epoch"])
                mixture = node.get(MIXTURE_KEY, mixture)
                pending.extend(node.values())
            elif isinstance(node, (list, tuple)):
                pending.extend(node)
        return cls(counts, dict(mixture["tokens"]), dict(mixture["target_share"]), records_per_epoch)

    def skipped(self, source: str) -> int:
        """Documents of `source` skipped for any reason."""
        return sum(self.counts[source][name] for name in SKIPPED)

    def epochs(self, source: str) -> float | None:
        """Passes read over `source` (see the module docstring), None when its length is unknown."""
        per_epoch = self.records_per_epoch.get(source)
        if not per_epoch:
            return None
        return (self.counts[source][DOCUMENTS] + self.skipped(source)) / per_epoch

    def token_share(self, source: str) -> float:
        """Share of the tokens trained on so far that came from `source`."""
        return self.tokens[source] / max(sum(self.tokens.values()), 1)

    def as_metrics(self, prefix: str = "data") -> dict[str, float]:
        """Flat {"data/<source>/<counter>": n, "data/<source>/tokens": n,
        "data/<source>/token_share": x, "data/<source>/target_share": x, "data/<source>/epochs": x}
        for a metrics logger."""
        metrics = {
            f"{prefix}/{source}/{name}": value
            for source, per_source in sorted(self.counts.items())
            for name, value in per_source.items()
        }
        for source in sorted(self.counts):
            if (epochs := self.epochs(source)) is not None:
                metrics[f"{prefix}/{source}/epochs"] = epochs
        for source in sorted(self.tokens):
            metrics[f"{prefix}/{source}/tokens"] = self.tokens[source]
            metrics[f"{prefix}/{source}/token_share"] = self.token_share(source)
            metrics[f"{prefix}/{source}/target_share"] = self.target_share[source]
        return metrics


def warn_rereads(stats: DataStats, warned: dict[str, int], step: int) -> None:
    """Warns once per source and power of ten (from `REREAD_WARN_EPOCHS`) of the passes read over
    it: a source read 10, 100, ... times over repeats its documents that often.  `warned`:
    source -> the passes already warned about (updated)."""
    for source in sorted(stats.counts):
        epochs = stats.epochs(source)
        level = REREAD_WARN_EPOCHS
        while epochs is not None and epochs >= level * 10:
            level *= 10
        if epochs is None or epochs < level or warned.get(source, 0) >= level:
            continue
        warned[source] = level
        _log.warning(
            "data source %r has been read %.0f times over by step %d (%d records per pass): it repeats "
            "its documents; add data to it or lower its weight",
            source,
            epochs,
            step,
            stats.records_per_epoch[source],
        )
