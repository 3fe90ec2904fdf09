"""Held-out documents for evaluation: the training source kinds, read in file order.

`--data path/to/file.jsonl` (or .parquet / .array_record) becomes a source of that kind with
the default field names.  Records with a problem (bad JSON, missing field, ...) and empty texts
are skipped and counted (a warning names the count, the reasons and the first one's file:line);
a source without any document is an error naming it.

The embedded sources have held-out splits:
  embedded_math  the problems of `eval.seed` (training generates those of data.seed).
  embedded_code  the last n documents of the training run's first pass over its embedded_code
                 source (the shuffle of data.seed and the source's name).  The run reads the
                 pass in order but for its shuffle window (data.shuffle_window chunks of at
                 most seq_len pairs, read ahead of the batches, and one chunk in the packer), so
                 it has not reached them while it has read fewer token pairs than the P pairs
                 of the documents before them; that is checked against its upper bound
                 steps x global_batch x seq_len + (window + 1) x seq_len (an error when P is
                 not above it).
                 Without a training run (a Hugging Face model) or an embedded_code source in
                 it: the first n files in name order.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from pathlib import Path

from frontier_jax.data import embedded
from frontier_jax.data.config import DataConfig, SourceConfig
from frontier_jax.data.pipeline import source_documents
from frontier_jax.data.sources import source_records
from frontier_jax.data.template import Document
from frontier_jax.data.tokenizer import Tokenizer
from frontier_jax.eval.config import EvalConfig, EvalSourceConfig

logger = logging.getLogger(__name__)

_SUFFIX_KINDS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "array_record"}


def source_from_path(path: str) -> EvalSourceConfig:
    """A text source for a data file named on the command line (kind from its suffix)."""
    kind = _SUFFIX_KINDS.get(Path(path).suffix)
    if kind is None:
        raise ValueError(
            f"--data {path}: unknown file type; use a .jsonl, .parquet or .array_record file "
            "with a 'text' field"
        )
    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    return EvalSourceConfig(name=Path(path).stem, kind=kind, path=path)


@dataclasses.dataclass(frozen=True)
class TrainingRun:
    """What a checkpoint was trained on, as far as the held-out splits need it: its data config
    and an upper bound on the token pairs it has read."""

    data: DataConfig
    tokens: int

    @classmethod
    def of(cls, config: dict, step: int) -> TrainingRun:
        """From a run config (as saved with a checkpoint) after `step` steps: the pairs of
        `step` full batches, global_batch x seq_len each, per context stage (`train.stages`),
        and the (shuffle window + 1) chunks of the longest seq_len reached read ahead of them."""

        def build(kind, values: dict):
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in values.items() if k in names})

        data = dict(config.get("data") or {})
        data["sources"] = [build(SourceConfig, s) for s in data.get("sources", [])]
        train = config["train"]
        stages = train.get("stages") or [{"until_step": step, **train}]
        tokens, begin, longest = 0, 0, 0
        for stage in stages:
            tokens += (
                max(min(step, stage["until_step"]) - begin, 0) * stage["global_batch"] * stage["seq_len"]
            )
            if begin < step or not longest:
                longest = max(longest, stage["seq_len"])
            begin = stage["until_step"]
        data_cfg = build(DataConfig, data)
        window = data_cfg.shuffle_window if data_cfg.shuffle else 0
        return cls(data_cfg, tokens + (window + 1) * longest)


@dataclasses.dataclass(frozen=True)
class EvalDocuments:
    name: str
    documents: list[Document]
    skipped: int  # records without a usable document


def held_out_code(
    source: EvalSourceConfig, count: int, tokenizer: Tokenizer, run: TrainingRun | None
) -> list[str]:
    """The embedded_code split of the module docstring: `count` (0 = all) documents."""
    trained = next((s for s in run.data.sources if s.kind == "embedded_code"), None) if run else None
    if trained is None:
        texts = list(embedded.code_dataset())
        return texts[:count] if count else texts
    # the same order without fill-in-the-middle rewriting (a map after the shuffle): plain texts
    documents = list(source_documents(run.data, dataclasses.replace(trained, fim_rate=0.0), num_epochs=1))
    if not count or count >= len(documents):
        raise ValueError(
            f"eval source {source.name!r}: the held-out split of the embedded code takes the last "
            f"files of a pass of {len(documents)}; set its max_documents to fewer"
        )
    before = sum(len(tokenizer.encode(d)) + 1 for d in documents[:-count])  # pairs: bos..eos
    if before <= run.tokens:
        raise ValueError(
            f"eval source {source.name!r}: the run may have read {run.tokens:,} token pairs, no fewer "
            f"than the {before:,} of the {len(documents) - count} code files its pass reads before the "
            f"last {count}, which may then be trained on; lower its max_documents or give held-out "
            "files (--data)"
        )
    return documents[-count:]


def read_documents(
    source: EvalSourceConfig, cfg: EvalConfig, tokenizer: Tokenizer, run: TrainingRun | None = None
) -> EvalDocuments:
    """The first cfg.documents_of(source) (0 = all) usable documents of `source`, in order (the
    held-out split of an embedded source), each plain text cut to its first source.max_chars."""
    count = cfg.documents_of(source)
    documents, problems, first_skipped = [], collections.Counter(), None
    if source.kind == "embedded_code":
        documents = held_out_code(source, count, tokenizer, run)
    else:
        records = source_records(source, seed=cfg.seed)
        for index in range(len(records)):
            if count and len(documents) >= count:
                break
            record = records[index]
            if record.problem is not None or (record.text is not None and not record.text.strip()):
                problems[record.problem or "empty_text"] += 1
                first_skipped = first_skipped or record.origin
            else:
                documents.append(record.text if record.text is not None else record.messages)
    skipped = sum(problems.values())
    if not documents:
        raise ValueError(
            f"eval data source {source.name!r} ({source.path or source.kind}) holds no document "
            f"({skipped} records skipped): give a file with non-empty '{source.text_field}' fields"
        )
    if skipped:
        logger.warning(
            "eval source %r (%s): %d of %d records skipped (%s; the first at %s); the figures cover "
            "the other %d",
            source.name,
            source.path or source.kind,
            skipped,
            skipped + len(documents),
            ", ".join(f"{name} {n}" for name, n in problems.most_common()),
            first_skipped,
            len(documents),
        )
    if source.max_chars:
        documents = [d[: source.max_chars] if isinstance(d, str) else d for d in documents]
    return EvalDocuments(source.name, documents, skipped)
