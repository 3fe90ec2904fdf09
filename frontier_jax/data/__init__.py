"""Input pipeline: per source screen -> tokenize -> window-shuffle -> pack; the mixture schedule
draws each row of a batch from one source.

it = build_train_iterator(cfg.data, seq_len=T, global_batch=B)
batch = next(it)                          # dict of int32 [B, T] arrays (the whole global batch)
stats = DataStats.from_state(it.get_state())   # document counts, tokens and shares per source
state = it.get_state()                    # JSON-serialisable; it.set_state(state) resumes
continue_documents(it2, state)            # it2 (other seq_len / batch) reads on from it's documents
"""

from frontier_jax.data.checkpoint import (
    orbax_restore_args,
    orbax_save_args,
    restore_iterator_state,
    save_iterator_state,
)
from frontier_jax.data.config import DataConfig, MixturePhase, RecordFormat, SourceConfig
from frontier_jax.data.continuation import continue_documents
from frontier_jax.data.pipeline import (
    build_train_dataset,
    build_train_iterator,
    source_documents,
    validate_train_args,
)
from frontier_jax.data.screen import DataError
from frontier_jax.data.stats import DataStats, warn_rereads
from frontier_jax.data.tokenizer import Tokenizer, byte_tokenizer, load_tokenizer

__all__ = [
    "DataConfig",
    "DataError",
    "DataStats",
    "MixturePhase",
    "RecordFormat",
    "SourceConfig",
    "Tokenizer",
    "build_train_dataset",
    "build_train_iterator",
    "byte_tokenizer",
    "continue_documents",
    "load_tokenizer",
    "orbax_restore_args",
    "orbax_save_args",
    "restore_iterator_state",
    "save_iterator_state",
    "source_documents",
    "validate_train_args",
    "warn_rereads",
]
