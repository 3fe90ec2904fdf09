"""Batch sources: where the trainer's global batches come from.

    batches.use_program(program)                                 the trainer's model program, once built
    batches.next(state)   -> {key: array [global_batch, ...]}   the next global batch, on the host
    batches.get_state()   -> a JSON-serialisable dict            saved with every checkpoint
    batches.set_state(s)                                         a restore: the same next batch
    batches.after_update(state)                                  after every step the loop runs
    batches.metrics(step) -> {name: figure}                      logged with step `step`
    batches.progress()    -> {name: text}                        shown on the progress bar

`state` is the current `TrainState` (its arrays on the devices): a source whose batches depend
on the model (samples of the current policy, scored by a reward) runs the trainer's model program
(`use_program`, before the first `next`), reads the parameters in `state` and hears of every
update in `after_update`.  Every process must return the same global batch (the
loop gives each device its block).  `TextBatches` is the grain text pipeline of the `data:`
section (pre-training, SFT); `PreferenceBatches` the pairs of `train.preference` (reward models);
`train(cfg, run_dir, batches=...)` takes any other.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from frontier_jax.data import (
    DataStats,
    build_train_iterator,
    continue_documents,
    load_tokenizer,
    warn_rereads,
)
from frontier_jax.data.preferences import pair_rows, read_preferences
from frontier_jax.data.template import ChatTemplate
from frontier_jax.runtime.program import ModelProgram
from frontier_jax.train.optimizer import batch_size_at
from frontier_jax.train.state import TrainState

if TYPE_CHECKING:  # the composed config sits above train
    from frontier_jax.config import Config


class BatchSource(abc.ABC):
    @abc.abstractmethod
    def next(self, state: TrainState) -> Mapping[str, np.ndarray]:
        """The next global batch (the objective's `batch_spec` keys)."""

    @abc.abstractmethod
    def get_state(self) -> dict[str, Any]:
        """The position after the last batch, JSON-serialisable."""

    @abc.abstractmethod
    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to a position `get_state` returned."""

    def use_program(self, program: ModelProgram) -> None:
        """Hands over the trainer's model program (its mesh, rules and model), before the first `next`."""

    def after_update(self, state: TrainState) -> None:
        """Called with the new state after every step (e.g. to hand new weights to a sampler)."""

    def metrics(self, step: int) -> dict[str, float]:
        """Figures logged with step `step`."""
        return {}

    def progress(self) -> dict[str, str]:
        """A few figures of the last batch for the progress bar, next to the loss."""
        return {}


def data_iterator(cfg: Config, continue_from: dict | None = None):
    """The grain iterator of the global batches, the same on every process.
    Batch k reads only the batch-size ramp's rows at step k; the rest of its rows are padding.
    continue_from: the iterator state of the previous context stage, whose document stream this
    one reads on from (packed at this config's seq_len)."""
    data = build_train_iterator(
        cfg.data,
        seq_len=cfg.train.seq_len,
        global_batch=cfg.train.global_batch,
        rows_at=lambda step: batch_size_at(cfg.train, step),
    )
    if continue_from is not None:
        continue_documents(data, continue_from)
    return data


class TextBatches(BatchSource):
    """The grain text pipeline of a run config (`data_iterator`); its metrics are the documents
    and tokens read per source, with a warning when a source is re-read many times over."""

    def __init__(self, cfg: Config, continue_from: dict | None = None):
        self.iterator = data_iterator(cfg, continue_from)
        self._rereads: dict[str, int] = {}  # source -> passes over it already warned about

    def next(self, state: TrainState) -> Mapping[str, np.ndarray]:
        return next(self.iterator)

    def get_state(self) -> dict[str, Any]:
        return self.iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.iterator.set_state(state)

    def start_prefetch(self) -> None:
        """Reads ahead (after a checkpoint restore, while the model restores)."""
        self.iterator.start_prefetch()

    def metrics(self, step: int) -> dict[str, float]:
        stats = DataStats.from_state(self.get_state())
        warn_rereads(stats, self._rereads, step)
        return stats.as_metrics()


class PreferenceBatches(BatchSource):
    """The pairs of `train.preference.data` (`data.preferences`: rendered by the tokenizer's chat
    template, or the project's format), global_batch / 2 pairs per batch (`pair_rows`: chosen
    and rejected side in rows 2i, 2i + 1), in a new order each epoch drawn from train.seed and
    the epoch; a pass that runs out mid-batch continues into the next one.  State: the epoch and
    the pairs of it already read."""

    def __init__(self, cfg: Config):
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
        template = ChatTemplate.of_tokenizer(cfg.data.tokenizer)
        self.pairs = read_preferences(
            cfg.train.preference.data, tokenizer, template, max_len=cfg.train.seq_len
        )
        self.seq_len, self.per_batch, self.pad_id = (
            cfg.train.seq_len,
            cfg.train.global_batch // 2,
            tokenizer.pad_id,
        )
        self.order = EpochOrder(len(self.pairs), cfg.train.seed)

    def next(self, state: TrainState) -> Mapping[str, np.ndarray]:
        return pair_rows([self.pairs[i] for i in self.order.take(self.per_batch)], self.seq_len, self.pad_id)

    def get_state(self) -> dict[str, Any]:
        return self.order.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.order.set_state(state)

    def metrics(self, step: int) -> dict[str, float]:
        return {"data/preference/epochs": self.order.epochs}


class EpochOrder:
    """Indices 0..n-1 in a new order each epoch, drawn from (seed, epoch); a pass that runs out
    mid-take continues into the next.  State: the epoch and the indices of it already taken."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.read = n, seed, 0, 0

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            part = order[self.read : self.read + count - len(taken)]
            taken += part.tolist()
            self.read += len(part)
            if self.read == self.n:
                self.epoch, self.read = self.epoch + 1, 0
        return taken

    @property
    def epochs(self) -> float:
        """Passes made, fractional."""
        return self.epoch + self.read / self.n

    def get_state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "read": self.read}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.read = int(state["epoch"]), int(state["read"])
