"""Typed configuration of the input pipeline (usable as OmegaConf structured configs)."""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

FILE_KINDS = ("jsonl", "parquet", "array_record")
CHAT_MATH_KIND = "embedded_chat_math"  # chats: arithmetic questions and answers (`chat_math.py`)
EMBEDDED_KINDS = ("embedded_code", "embedded_math", CHAT_MATH_KIND)
PREPARED_KIND = "prepared"  # a directory written by `frontier-jax data prepare` (prepared.py)
SOURCE_KINDS = FILE_KINDS + EMBEDDED_KINDS + (PREPARED_KIND,)


class RecordFormat(enum.StrEnum):
    """What a record of a file source holds (see `records.py`, rendered by `template.py`).

    text             `text_field`: a plain document, every target trained on.
    prompt_response  `prompt_field`, `response_field`: a user turn and an assistant turn.
    chat             `messages_field`: a list of {"role": system|user|assistant, "content": str}.
    The structured formats train only on the assistant turns.
    """

    text = "text"
    prompt_response = "prompt_response"
    chat = "chat"


@dataclasses.dataclass
class Difficulty:
    """A level of the chat arithmetic source: between `min_operations` and `max_operations`
    operations among + - *, operands 0..max_operand (0..max_factor for the factor a product adds).
    The default is one operation over the embedded source's ranges."""

    min_operations: int = 1
    max_operations: int = 1
    max_operand: int = 99
    max_factor: int = 12

    def validate(self, where: str = "difficulty") -> "Difficulty":
        if not 1 <= self.min_operations <= self.max_operations:
            raise ValueError(
                f"{where}: min_operations={self.min_operations}, max_operations={self.max_operations}: "
                "need 1 <= min_operations <= max_operations"
            )
        for name in ("max_operand", "max_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{where}.{name}={getattr(self, name)} must be >= 1")
        return self


# The SourceConfig attributes naming the fields of each format.
_FORMAT_FIELDS = {
    RecordFormat.text: ("text_field",),
    RecordFormat.prompt_response: ("prompt_field", "response_field"),
    RecordFormat.chat: ("messages_field",),
}


@dataclasses.dataclass
class SourceConfig:
    """One data source of the mixture.

    Attributes:
      name: unique label, used in data stats and in the iterator state.
      kind: one of `SOURCE_KINDS`.
      path: a file or a glob pattern; required for file kinds; for kind prepared the
        directory of one prepared source (`<data prepare --out>/<name>`); unused otherwise.
      weight: relative share of the rows (tokens) drawn from this source (>= 0; the
        weights of all sources must sum to > 0), from step 0 until the first of `data.stages`.
      format: what a record holds (`RecordFormat`); embedded sources are text, a prepared
        source's format is the one it was prepared from (leave it text).
      text_field: JSON key (jsonl, JSON array_record records) or Parquet column
        holding the document text (format text).
      prompt_field, response_field: the keys / columns of a prompt_response record.
      messages_field: the key / column of a chat record's list of messages.
      fim_rate: share of this source's documents made fill-in-the-middle examples (`fim.py`),
        in [0, 1]; the DeepSeek-V3 report uses 0.1. Plain text (format text), not prepared.
      fim_spm_share: share of the FIM examples in the SPM layout, the rest PSM, in [0, 1].
      difficulty: the level of kind embedded_chat_math (operations, operand range); unused otherwise.
    """

    name: str
    kind: str
    path: Optional[str] = None
    weight: float = 1.0
    format: RecordFormat = RecordFormat.text
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    fim_rate: float = 0.0
    fim_spm_share: float = 0.0
    difficulty: Difficulty = dataclasses.field(default_factory=Difficulty)

    @property
    def renders_chat(self) -> bool:
        """Whether its documents are chats (format prompt_response or chat, or the embedded chat
        arithmetic), rendered by the chat template with loss on the assistant turns only."""
        return self.format != RecordFormat.text or self.kind == CHAT_MATH_KIND

    def fields(self) -> tuple[str, ...]:
        """The keys / columns a record of this source's format is read from."""
        return tuple(getattr(self, name) for name in _FORMAT_FIELDS[RecordFormat(self.format)])

    def validate(self, where: str = "data.sources[?]") -> "SourceConfig":
        """Raises ValueError naming the field, its value and the fix."""
        if not self.name:
            raise ValueError(f"{where}.name is empty: give every source a unique name.")
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"{where}.kind={self.kind!r} is not supported: use one of {list(SOURCE_KINDS)}.")
        if self.kind in FILE_KINDS and not self.path:
            raise ValueError(f"{where}.path is not set for kind={self.kind!r}: give a file path or a glob.")
        if self.kind == PREPARED_KIND and not self.path:
            raise ValueError(
                f"{where}.path is not set for kind={self.kind!r}: give the directory of a prepared "
                "source (frontier-jax data prepare --out DIR writes DIR/<source name>)."
            )
        if not self.weight >= 0:
            raise ValueError(
                f"{where}.weight={self.weight!r} must be >= 0: give a share, or 0 to leave the source out."
            )
        if self.kind in EMBEDDED_KINDS and self.format != RecordFormat.text:
            raise ValueError(
                f"{where}.format={RecordFormat(self.format).value!r}: embedded sources have a format of "
                "their own (embedded_chat_math: chats, the others: plain text); leave format unset."
            )
        if self.kind == CHAT_MATH_KIND:
            self.difficulty.validate(f"{where}.difficulty")
        if self.kind == PREPARED_KIND and self.format != RecordFormat.text:
            raise ValueError(
                f"{where}.format={RecordFormat(self.format).value!r}: a prepared source holds documents "
                "rendered at preparation in the format they were read with; leave format unset."
            )
        for field_name in ("fim_rate", "fim_spm_share"):
            if not 0 <= getattr(self, field_name) <= 1:
                raise ValueError(
                    f"{where}.{field_name}={getattr(self, field_name)!r} is a share of documents: "
                    "give a value in [0, 1]."
                )
        if self.fim_rate and self.renders_chat:
            raise ValueError(
                f"{where}.fim_rate={self.fim_rate!r} with format={RecordFormat(self.format).value!r}: "
                "fill-in-the-middle applies to plain text; set fim_rate=0 for this source."
            )
        if self.fim_rate and self.kind == PREPARED_KIND:
            raise ValueError(
                f"{where}.fim_rate={self.fim_rate!r} with kind={PREPARED_KIND!r}: fill-in-the-middle cuts "
                "text and a prepared source holds token ids; read the source raw for FIM, or set fim_rate=0."
            )
        for field_name in _FORMAT_FIELDS[RecordFormat(self.format)]:
            if self.kind in FILE_KINDS and not getattr(self, field_name):
                raise ValueError(f"{where}.{field_name} is empty: name the field holding it.")
        return self


@dataclasses.dataclass
class MixturePhase:
    """Mixture weights from one step on (see `DataConfig.stages`).

    Attributes:
      start_step: the first step (0-based: the number of steps done before it) whose batch
        is drawn with these weights.
      weights: {source name: relative share of rows (>= 0)}; a source not named gets 0.
    """

    start_step: int
    weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self, names: list[str], where: str) -> "MixturePhase":
        """Raises ValueError naming the field, its value and the fix."""
        for name, weight in self.weights.items():
            if name not in names:
                raise ValueError(
                    f"{where}.weights names source {name!r}, which is not in data.sources "
                    f"(sources: {names}): fix the name or add the source."
                )
            if not weight >= 0:
                raise ValueError(f"{where}.weights.{name}={weight!r} must be >= 0.")
        if not sum(self.weights.values()) > 0:
            raise ValueError(
                f"{where}.weights={dict(self.weights)} do not sum to a positive total: "
                "give at least one source a weight > 0."
            )
        return self


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="code", kind="embedded_code", weight=0.7),
        SourceConfig(name="math", kind="embedded_math", weight=0.3),
    ]


@dataclasses.dataclass
class DataConfig:
    """The whole input pipeline.

    Attributes:
      sources: the mixture; default is the embedded code (0.7) + math (0.3) set.
      stages: the mixture schedule: from each stage's start_step (strictly increasing) its
        weights replace the sources' ones; [] = the sources' weights throughout.
      tokenizer: "byte" for the built-in byte-level tokenizer, else a path to a
        Hugging Face tokenizer.json.
      special_tokens: {name: token string} replacing the strings looked up for the named
        special tokens (`tokenizer.SPECIAL_TOKENS`), e.g. {"fim_begin": "<|fim_prefix|>"}.
      mask_documents: False = pre-training (rows are concatenated documents that
        may attend to each other, positions 0..T-1); True = SFT (one segment id per
        document, positions restart at 0, no attention across documents).
      max_document_chars: longer documents are split into pieces of at most this
        many characters (each piece is a document of its own) and counted.
      min_document_chars: shorter documents are skipped and counted.
      max_skipped_in_a_row: a source that skips this many records in a row
        (bad, empty or too short) without a document is an error naming it.
      shuffle: shuffle each source globally (reshuffled every epoch), then its chunks
        through `shuffle_window`; False reads every source in order.
      shuffle_window: chunks (pieces of at most seq_len tokens of a document) of each source
        shuffled together before packing, so that the rows of a batch come from many
        documents and a long document is spread over many batches; 0 = chunks in order.
        Memory: window x seq_len x 12 bytes per source (and per worker).
      seed: seed of shuffling and of the generated math problems.
      worker_count: grain worker processes (0 = in the training process). Each
        worker packs its own slice of every source, so the batches depend on
        this number: resume with the same value.
    """

    sources: list[SourceConfig] = dataclasses.field(default_factory=_default_sources)
    stages: list[MixturePhase] = dataclasses.field(default_factory=list)
    tokenizer: str = "byte"
    special_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    mask_documents: bool = False
    max_document_chars: int = 200_000
    min_document_chars: int = 1
    max_skipped_in_a_row: int = 10_000
    shuffle: bool = True
    shuffle_window: int = 1024
    seed: int = 0
    worker_count: int = 0

    def validate(self) -> "DataConfig":
        """Raises ValueError naming the field, its value and the fix; returns self."""
        if not self.sources:
            raise ValueError("data.sources is empty: list at least one source.")
        names = [s.name for s in self.sources]
        for i, source in enumerate(self.sources):
            source.validate(f"data.sources[{i}]")
            if source.name in names[:i]:
                raise ValueError(
                    f"data.sources[{i}].name={source.name!r} is used twice: names must be unique."
                )
        if not sum(s.weight for s in self.sources) > 0:
            raise ValueError(
                f"data.sources[*].weight={[s.weight for s in self.sources]} do not sum to a positive total: "
                "give at least one source a weight > 0."
            )
        for i, stage in enumerate(self.stages):
            stage.validate(names, f"data.stages[{i}]")
            previous = self.stages[i - 1].start_step if i else -1
            if stage.start_step <= previous:
                raise ValueError(
                    f"data.stages[{i}].start_step={stage.start_step} is not after "
                    + (f"data.stages[{i - 1}].start_step={previous}" if i else "-1 (steps count from 0)")
                    + ": list the stages by strictly increasing start_step."
                )
        if not self.tokenizer:
            raise ValueError('data.tokenizer is empty: use "byte" or a path to tokenizer.json.')
        if self.min_document_chars < 1:
            raise ValueError(f"data.min_document_chars={self.min_document_chars} must be >= 1.")
        if self.max_document_chars < self.min_document_chars:
            raise ValueError(
                f"data.max_document_chars={self.max_document_chars} is below "
                f"data.min_document_chars={self.min_document_chars}: raise it."
            )
        if self.max_skipped_in_a_row < 1:
            raise ValueError(f"data.max_skipped_in_a_row={self.max_skipped_in_a_row} must be >= 1.")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"data.seed={self.seed} must be in [0, 2**32).")
        if self.shuffle_window < 0:
            raise ValueError(
                f"data.shuffle_window={self.shuffle_window} must be >= 0 (0 = no shuffle window)."
            )
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count={self.worker_count} must be >= 0 (0 = no workers).")
        return self
