"""The `eval:` section of the run configuration: held-out data, context window, stride, batch."""

from __future__ import annotations

import dataclasses

from frontier_jax.data.config import SourceConfig


@dataclasses.dataclass
class EvalSourceConfig(SourceConfig):
    """A held-out source: the keys of a training source (`data.sources[i]`) and how much of it
    is scored.  The embedded sources have held-out splits (`eval.datasets`): embedded_math is
    generated with `eval.seed`, embedded_code is the files a training run reads last.

    Attributes:
      max_documents: documents read (0 = eval.max_documents).
      max_chars: a plain text's first max_chars characters are scored (0 = all of it).
    """

    max_documents: int = 0
    max_chars: int = 0

    def validate(self, where: str = "eval.data[?]") -> None:
        super().validate(where)
        for name in ("max_documents", "max_chars"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{where}.{name}={getattr(self, name)} must be >= 0 (0 = no limit of its own)"
                )


def _held_out_sources() -> list[EvalSourceConfig]:
    """Arithmetic problems of another seed than training's, and the first 4,000 characters of
    the 16 standard-library files a training run reads last (`eval.datasets`)."""
    return [
        EvalSourceConfig(name="math_held_out", kind="embedded_math"),
        EvalSourceConfig(name="code_held_out", kind="embedded_code", max_documents=16, max_chars=4000),
    ]


@dataclasses.dataclass
class EvalConfig:
    """Evaluation of a model on held-out text (`frontier_jax.eval.perplexity`).

    Attributes:
      data: the held-out sources (any training source kind, `EvalSourceConfig`); default:
        64 generated arithmetic problems of seed `seed` and the beginnings of 16 held-out
        standard-library files.
      max_documents: documents read per source without a max_documents of its own, in file
        order (0 = all; the endless embedded_math source needs a limit).
      seq_len: the context window (0 = train.seq_len).
      stride: a document longer than the window is scored by windows starting every `stride`
        pairs; each window scores only the pairs that no earlier window scored, the rest of
        it is context (0 = seq_len: disjoint windows).
      batch_size: rows per evaluation step (a multiple of the mesh's batch split).
      every: during training, evaluate every N steps (0 = never).
      seed: seed of the generated held-out problems (training uses data.seed).
      samples: completions sampled per prompt by chat tasks (`chat.py`), for pass@k.
      pass_k: the k of the pass@k figures of chat tasks (each <= samples).
      sample_seed: seed of the chat tasks' samples.
    """

    data: list[EvalSourceConfig] = dataclasses.field(default_factory=_held_out_sources)
    max_documents: int = 64
    seq_len: int = 0
    stride: int = 0
    batch_size: int = 8
    every: int = 0
    seed: int = 1234
    samples: int = 16
    pass_k: list[int] = dataclasses.field(default_factory=lambda: [1, 8])
    sample_seed: int = 0

    def validate(self) -> "EvalConfig":
        if not self.data:
            raise ValueError("eval.data is empty: list at least one source (same keys as data.sources)")
        for i, source in enumerate(self.data):
            source.validate(f"eval.data[{i}]")
            if source.kind == "embedded_math" and self.documents_of(source) <= 0:
                raise ValueError(
                    f"eval.data[{i}] is the endless embedded_math source: set eval.max_documents > 0 "
                    f"or eval.data[{i}].max_documents > 0"
                )
        for name in ("max_documents", "seq_len", "stride", "every"):
            if getattr(self, name) < 0:
                raise ValueError(f"eval.{name}={getattr(self, name)} must be >= 0")
        if self.samples <= 0 or not all(1 <= k <= self.samples for k in self.pass_k):
            raise ValueError(
                f"eval.samples={self.samples}, eval.pass_k={list(self.pass_k)}: need samples >= 1 and "
                "1 <= k <= samples for each k"
            )
        if self.batch_size <= 0:
            raise ValueError(f"eval.batch_size={self.batch_size} must be > 0")
        if self.seq_len and self.seq_len < 2:
            raise ValueError(f"eval.seq_len={self.seq_len} must be >= 2 (or 0 for train.seq_len)")
        if self.stride and self.seq_len and self.stride > self.seq_len:
            raise ValueError(
                f"eval.stride={self.stride} exceeds eval.seq_len={self.seq_len}: windows would "
                "skip tokens; use a stride <= seq_len"
            )
        return self

    def documents_of(self, source: EvalSourceConfig) -> int:
        """The documents read from `source` (its own max_documents, else eval.max_documents)."""
        return source.max_documents or self.max_documents

    def window(self, train_seq_len: int, max_positions: int) -> tuple[int, int]:
        """(context window, stride) with the 0 defaults resolved, for a model of `max_positions`
        positions (model.max_position_embeddings): a longer window is refused."""
        seq_len = self.seq_len or train_seq_len
        if seq_len > max_positions:
            raise ValueError(
                f"eval.seq_len={seq_len} exceeds the model's context, model.max_position_embeddings="
                f"{max_positions}: lower eval.seq_len"
            )
        stride = self.stride or seq_len
        if stride > seq_len:
            raise ValueError(f"eval.stride={stride} exceeds the window {seq_len}: use a stride <= seq_len")
        return seq_len, stride
