"""The training input pipeline: per source, screen -> tokenize -> window-shuffle -> pack into
rows; then the mixture schedule draws each row of each batch from one source's rows.

Every process runs the same deterministic pipeline and yields the whole global
batch of B rows, whatever the number of processes: which rows a process needs
depends on the device layout (the batch split across processes, replicated
across them when `tensor` spans hosts, or both), so the training loop hands each
of its devices the rows that device addresses. The iterator state is then the
same on every process. The price is that each process tokenizes and packs every row.

Each row holds chunks of one source, and the mixture weights (`data.sources[*].weight`, then
`data.stages`) are shares of real tokens: the schedule picks each row's source by token deficit,
so rows that carry padding (mask_documents=True) count only their tokens; batch k draws its
rows with the weights of the stage of step k (`mixture.py`). With `data.worker_count` > 0 every source's rows are made
by that many worker processes. With a batch-size ramp only the first rows_at(k) rows of batch
k are read; the rest are padding rows (loss_mask 0, segment_ids 0; see `batching.py`).

Batches are dicts of int32 numpy arrays [B, T]:
  input_ids    token ids fed to the model (pad_id on padding)
  targets      the next token of the same document (pad_id on padding)
  loss_mask    1 where the target is trained on: a real next token of a plain
               document or of an assistant turn (see template.py); 0 on padding
  segment_ids  0 on padding; else 1 (mask_documents=False) or the document's
               number within its row, from 1 (mask_documents=True)
  positions    0..T-1 (mask_documents=False) or the position within the
               document, restarting at 0 (mask_documents=True)
"""

from __future__ import annotations

import functools
import os
import zlib
from typing import Callable, Optional

import grain
from absl import flags

from frontier_jax.data.batching import MixtureBatchIterDataset
from frontier_jax.data.config import DataConfig, SourceConfig
from frontier_jax.data.continuation import DocumentStream
from frontier_jax.data.fim import fim_documents
from frontier_jax.data.mixture import MixtureSchedule
from frontier_jax.data.packing import pack_documents
from frontier_jax.data.parent_watch import exit_with_grain_parent
from frontier_jax.data.prepared import check_prepared
from frontier_jax.data.screen import ScreenIterDataset
from frontier_jax.data.sources import source_records
from frontier_jax.data.template import ChatTemplate
from frontier_jax.data.tokenizer import CHAT_SPECIALS, FIM_SPECIALS, Tokenizer, load_tokenizer

_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)
_MIN_PACKING_BINS = 16


def validate_train_args(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch: int,
    num_epochs: Optional[int],
) -> None:
    """Raises ValueError naming the field and the fix before any data is read."""
    cfg.validate()
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs room for a next token).")
    if global_batch < 1:
        raise ValueError(f"global_batch={global_batch} must be >= 1.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs={num_epochs} must be >= 1, or None to repeat forever.")


def _source_seed(cfg: DataConfig, source: SourceConfig, purpose: str = "") -> int:
    """Seed of one source's shuffle (purpose "") or other draws: from data.seed, the purpose and
    the source's name (not its list position)."""
    return (cfg.seed + zlib.crc32((purpose + source.name).encode())) % 2**32


def source_documents(cfg: DataConfig, source: SourceConfig, num_epochs: Optional[int]) -> grain.IterDataset:
    """IterDataset[str] of the screened documents of one source, repeated `num_epochs` times.

    With data.shuffle each epoch is globally shuffled, differently per epoch. With
    `source.fim_rate` > 0 some documents are fill-in-the-middle examples (`fim.py`).
    """
    records = source_records(source, seed=cfg.seed)
    if cfg.shuffle:
        records = records.shuffle(seed=_source_seed(cfg, source))
    documents = ScreenIterDataset(
        records.repeat(num_epochs).to_iter_dataset(_READ_OPTIONS),
        source=source.name,
        min_chars=cfg.min_document_chars,
        max_chars=cfg.max_document_chars,
        max_skipped_in_a_row=cfg.max_skipped_in_a_row,
        records_per_epoch=len(records),
    )
    return fim_documents(
        documents,
        rate=source.fim_rate,
        spm_share=source.fim_spm_share,
        seed=_source_seed(cfg, source, "fim/"),
    )


def source_rows(
    cfg: DataConfig,
    source: SourceConfig,
    *,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch: int,
    num_epochs: Optional[int],
) -> grain.IterDataset:
    """IterDataset of the packed rows of one source (`packing.pack_documents`), made by
    `data.worker_count` worker processes when > 0."""
    rows = pack_documents(
        DocumentStream(source_documents(cfg, source, num_epochs)),  # carried to other rows (continuation.py)
        tokenizer=tokenizer,
        seq_len=seq_len,
        mask_documents=cfg.mask_documents,
        num_bins=max(global_batch, _MIN_PACKING_BINS),
        shuffle_window=cfg.shuffle_window if cfg.shuffle else 0,
        seed=_source_seed(cfg, source, "window/"),
        template=ChatTemplate.of_tokenizer(cfg.tokenizer) if source.renders_chat else None,
    )
    if cfg.worker_count:
        # grain 0.2.18 workers read absl flags, which fails unless they were parsed
        # (google/grain#1355); programs that do not use absl.app parse none.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        rows = rows.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=cfg.worker_count),
            worker_init_fn=functools.partial(exit_with_grain_parent, os.getpid()),  # no orphans
        )
    return rows


def build_train_dataset(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch: int,
    rows_at: Optional[Callable[[int], int]] = None,
    num_epochs: Optional[int] = None,
) -> grain.IterDataset:
    """The IterDataset of the global batches (see the module docstring).

    `rows_at(k)`: the rows of batch k (from 0) read from the data, the rest padding (the
    batch-size ramp, `batching.py`); default: all `global_batch` rows.
    `num_epochs`: passes over each source (None = forever); with several sources
    the mixture ends when the first source it draws from runs out. A last incomplete batch
    is dropped.
    """
    validate_train_args(cfg, seq_len=seq_len, global_batch=global_batch, num_epochs=num_epochs)
    tokenizer = load_tokenizer(cfg.tokenizer, cfg.special_tokens)
    if any(s.renders_chat for s in cfg.sources) and ChatTemplate.of_tokenizer(cfg.tokenizer) is None:
        for name in CHAT_SPECIALS:
            tokenizer.special_id(name)  # the project's chat format's tokens exist, before any data is read
    if any(s.fim_rate for s in cfg.sources):
        for name in FIM_SPECIALS:
            tokenizer.special_id(name)
    check_prepared(cfg, tokenizer)  # prepared shards intact and of this tokenizer, before training
    rows = {
        s.name: source_rows(
            cfg, s, tokenizer=tokenizer, seq_len=seq_len, global_batch=global_batch, num_epochs=num_epochs
        )
        for s in cfg.sources
    }
    return MixtureBatchIterDataset(
        rows,
        schedule=MixtureSchedule.from_config(cfg),
        global_batch=global_batch,
        seq_len=seq_len,
        rows_at=rows_at or (lambda _: global_batch),
        pad_id=tokenizer.pad_id,
    )


def build_train_iterator(
    cfg: DataConfig,
    *,
    seq_len: int,
    global_batch: int,
    rows_at: Optional[Callable[[int], int]] = None,
    num_epochs: Optional[int] = None,
) -> grain.DatasetIterator:
    """Iterator of the global batches; supports `get_state()` / `set_state()`."""
    return iter(
        build_train_dataset(
            cfg, seq_len=seq_len, global_batch=global_batch, rows_at=rows_at, num_epochs=num_epochs
        )
    )
