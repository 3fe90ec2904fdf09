"""Checkpoints with orbax-checkpoint's CheckpointManager.

Each checkpoint step holds three items (four with an objective's state):
    state   the train state (`TrainState`: params, biases, opt_state, step, rng)   StandardSave
    extra   `TrainState.extra`, the objective's own state, when it holds arrays    StandardSave
    data    the batch source's state (JSON, one file per process)           grain's handler
    config  the resolved run config of the checkpoint's context stage (JSON) JsonSave
            and, under "stage", the stage's index and steps (`train.phases.ContextPhase`)
Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint as the latest).  Restore
takes an abstract state whose leaves carry the *current* shardings, so a checkpoint written
on one mesh restores onto another (e.g. 8 devices -> 1).

Integrity: once a save has committed, process 0 writes the step's checksum manifest
(`runtime.integrity`: the size and SHA-256 of every file of the step), at the next `poll()` or
`wait()`; restores verify it first.

Faults: a save that cannot be written (directory gone or not writable, disk full) raises
`CheckpointError` naming the directory, at the save or at the next `poll()` (each step) when
it fails in orbax's background thread; the previous checkpoint stays the latest.  A latest
checkpoint that does not verify or restore (truncated or bit-flipped file, no manifest after
an earlier step had one, missing `_METADATA`, bad iterator JSON) is renamed
`<step>.corrupt-<reason>` (kept, not deleted) with a warning, and the newest earlier one that
restores is used (`restore_latest`); every step it passed over is moved aside.  A step written
before manifests existed restores with a warning that it is unverified.

The directory is an etils `epath` path: local, or `gs://` and other object stores where their
epath and tensorstore backends are installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from omegaconf import OmegaConf

from frontier_jax.data import SourceConfig
from frontier_jax.data.checkpoint import orbax_restore_args, orbax_save_args
from frontier_jax.model import ModelConfig
from frontier_jax.runtime.expert_ledger import EXPERT_LOAD_FILE, LedgerSteps, save_expert_load
from frontier_jax.runtime.integrity import (
    CORRUPT,
    UNVERIFIED,
    CheckpointError,
    first_line,
    raise_interruption,
    verify_step,
    write_manifest,
)
from frontier_jax.train.config import CheckpointConfig
from frontier_jax.train.state import TrainState

log = logging.getLogger(__name__)

# Files without which a step's state cannot be read back (orbax lays the rest out itself).
_REQUIRED_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "config/metadata")


def _flatten(d: dict, prefix: str = "") -> dict:
    """{"a.b": v, "a.list.0.c": w, ...} of a nested dict (lists indexed by position)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = dict(enumerate(v))
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _differences(saved: dict, current: dict) -> list[str]:
    return [
        f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


def check_same_model(saved: dict, current: dict, directory: epath.Path) -> None:
    """Raises if the checkpoint's architecture (the `model:` section, but its `name`) differs
    from the current one, naming the fields; the `impl:` section may change on resume.  Fields
    newer than the checkpoint (absent from it) count at their defaults."""
    defaults = _flatten(OmegaConf.to_container(OmegaConf.structured(ModelConfig), enum_to_str=True))
    saved_model = {**defaults, **_flatten(saved.get("model", {}))}
    current_model = _flatten(current.get("model", {}))
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {current_model.get(k)!r}"
        for k in sorted(set(saved_model) | set(current_model))
        if k != "name" and saved_model.get(k) != current_model.get(k)
    ]
    if diffs:
        raise ValueError(
            f"checkpoint directory {directory} holds a different model:\n  "
            + "\n  ".join(diffs)
            + "\nuse a new --run-dir, or the config the checkpoint was written with"
        )


# The saved data-iterator position is a position in the stream these fields define: every
# data field but the skip bound, and the batch shape (the batch-size ramp reads rows_at(k) rows).
_STREAM_FIELDS = ("train.seq_len", "train.global_batch", "train.batch_ramp_steps", "train.batch_ramp_start")
_NOT_STREAM_FIELDS = ("data.max_skipped_in_a_row",)


def _stream(config: dict) -> dict:
    flat = _flatten({"data": config.get("data", {}), "train": config.get("train", {})})
    return {
        k: v
        for k, v in flat.items()
        if (k.startswith("data.") and k not in _NOT_STREAM_FIELDS) or k in _STREAM_FIELDS
    }


def _with_source_defaults(stream: dict) -> dict:
    """`stream` with the source fields newer than it (absent) at their `SourceConfig` defaults."""
    defaults = {
        f.name: f.default for f in dataclasses.fields(SourceConfig) if f.default is not dataclasses.MISSING
    }
    sources = {k.split(".")[2] for k in stream if k.startswith("data.sources.")}
    return {**{f"data.sources.{i}.{name}": v for i in sources for name, v in defaults.items()}, **stream}


def check_same_data_stream(saved: dict, current: dict, directory: epath.Path) -> None:
    """Raises if the checkpoint's data iterator was saved for another data stream (packing mode,
    sources, tokenizer, seq_len, batch ...): its position cannot be applied to this one."""
    saved_stream, current_stream = _with_source_defaults(_stream(saved)), _stream(current)
    # a field newer than the checkpoint has its default value there; sources are compared whole
    # (their newer fields at the defaults), so a source the checkpoint lacks is a difference
    current_stream = {
        k: v for k, v in current_stream.items() if k in saved_stream or k.startswith("data.sources.")
    }
    diffs = _differences(saved_stream, current_stream)
    if diffs:
        raise ValueError(
            f"checkpoint directory {directory} saved its data position in another data stream ("
            + "; ".join(diffs)
            + "). Resume with the checkpoint's data settings, or pass "
            "--restart-data to keep the trained state and read this stream from its start"
        )


def check_same_phase(saved: dict, stage: dict, step: int, directory: epath.Path) -> None:
    """Raises if checkpoint `step` was written in another context stage than the one the
    current `train.stages` put its last step in (`stage`: `ContextPhase.record()`); checkpoints
    written before stages were recorded are taken as they are."""
    recorded = saved.get("stage")
    if recorded is not None and recorded.get("index") != stage["index"]:
        raise ValueError(
            f"checkpoint {step} in {directory} was written in context stage {recorded.get('index')} "
            f"(steps {recorded.get('start_step')}..{recorded.get('until_step')}), but train.stages puts "
            f"step {step} in stage {stage['index']} (steps {stage['start_step']}..{stage['until_step']}); "
            "resume with the checkpoint's train.stages"
        )


class Checkpointer:
    def __init__(self, directory: epath.PathLike, cfg: CheckpointConfig):
        self.directory = epath.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, create=True, enable_async_checkpointing=cfg.async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # step of an asynchronous save not yet checked
        self._pending_load: LedgerSteps | None = None  # that step's expert load, written with it

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def _save_failed(self, step: int, err: BaseException) -> CheckpointError:
        self.manager.reload()
        latest = self.latest_step()
        kept = "no checkpoint is kept" if latest is None else f"the latest checkpoint is still {latest}"
        return CheckpointError(
            f"saving checkpoint {step} in {self.directory} failed ({first_line(err)}); {kept}. "
            "Free space or fix the directory, then run the same command again to resume"
        )

    def _check_writable(self, step: int) -> None:
        """Orbax creates a step's directory in a helper thread and waits for it without a bound,
        so a directory it cannot write (gone, a file, read-only) hangs `save`; test it first."""
        probe = self.directory / f".write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise self._save_failed(step, err) from err

    def poll(self) -> None:
        """Raises `CheckpointError` if the last asynchronous save has failed; call every step."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def save(
        self,
        step: int,
        state: Any,
        data_iterator: grain.DatasetIterator,
        config: dict,
        expert_load: LedgerSteps | None = None,
    ) -> None:
        """Starts saving `step` (asynchronously when checkpoint.async_save).  `data_iterator`:
        anything with a JSON-serialisable `get_state()` (a grain iterator, a
        `train.batches.BatchSource`); `expert_load` (the
        expert-load ledger's window, its steps) is written as <step>/expert_load.npz once the
        step has committed, before its checksums, which cover it."""
        self._check_writable(step)
        self.wait()  # the previous save's errors, before starting another
        core, extra = _split_extra(state)
        items = {"state": ocp.args.StandardSave(core)}
        if extra:
            items["extra"] = ocp.args.StandardSave(extra)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    **items, data=orbax_save_args(data_iterator), config=ocp.args.JsonSave(config)
                ),
                force=True,
            )
        except Exception as err:
            raise self._save_failed(step, err) from err
        self._pending = step
        self._pending_load = expert_load

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """Returns the state laid out as `abstract_state` (a pytree of ShapeDtypeStructs with
        `sharding` set) and moves `data_iterator` to the saved position (None: leaves the
        saved position unread)."""
        core, extra = _split_extra(abstract_state)
        items = {"state": ocp.args.StandardRestore(core)}
        if extra:
            items["extra"] = ocp.args.StandardRestore(extra)
        if data_iterator is not None:
            items["data"] = orbax_restore_args(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if not isinstance(abstract_state, TrainState):
            return restored.state
        return TrainState(**restored.state, extra=restored.extra if extra else abstract_state.extra)

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def _missing_file(self, step: int) -> str | None:
        step_dir = self.directory / str(step)
        return next((name for name in _REQUIRED_FILES if not (step_dir / name).exists()), None)

    def _move_aside(self, step: int, reason: str) -> epath.Path:
        target = self.directory / f"{step}.corrupt-{reason}"
        if jax.process_index() == 0:
            (self.directory / str(step)).replace(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"frontier_jax checkpoint {step} moved aside")
        self.manager.reload()
        return target

    def restore_latest(
        self,
        abstract_state: Any,
        data_for: Callable[[int], grain.DatasetIterator | None],
        check_config: Callable[[int, dict], None],
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, or None when there is none.

        `data_for(step)`: the iterator to move to checkpoint `step`'s data position (a fresh one
        per call: the pipeline of that step's context stage), or None to leave it unread.
        `check_config(step, saved_config)` raises (ValueError) when the run's config cannot resume
        from it; that error ends the search.  Checkpoints newer than the one restored that failed
        to restore are moved aside (`<step>.corrupt-<reason>`) with a warning; if none restores,
        nothing is moved and `CheckpointError` names the latest and why."""
        failures: list[tuple[int, str, str]] = []  # (step, reason, detail)
        for step in sorted(self.manager.all_steps(), reverse=True):
            missing = self._missing_file(step)
            if missing is not None:
                failures.append(
                    (
                        step,
                        "missing-" + missing.split("/")[-1].strip("_"),
                        f"{self.directory / str(step) / missing} is missing",
                    )
                )
                continue
            verdict = verify_step(self.directory, step)
            if verdict.status == CORRUPT:
                failures.append((step, verdict.reason, verdict.detail))
                continue
            try:
                saved_config = self.read_config(step)
            except Exception as err:
                raise_interruption(err)
                failures.append((step, "unreadable", f"its config does not read: {first_line(err)}"))
                continue
            check_config(step, saved_config)
            try:
                state = self.restore(step, abstract_state, data_for(step))
            except Exception as err:
                raise_interruption(err)
                failures.append((step, "unreadable", first_line(err)))
                continue
            if verdict.status == UNVERIFIED:
                log.warning("checkpoint %d in %s is unverified: %s", step, self.directory, verdict.detail)
            for bad, reason, detail in failures:
                target = self._move_aside(bad, reason)
                log.warning(
                    "checkpoint %d does not restore (%s): moved to %s; resuming from step %d",
                    bad,
                    detail,
                    target,
                    step,
                )
            return step, state
        if failures:
            step, _, detail = failures[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores; the latest, step {step}: {detail}. "
                "Move the broken step directories away to start afresh"
            )
        return None

    def wait(self) -> None:
        """Blocks until the pending save is written, then writes its checksum manifest (process 0);
        `CheckpointError` if either failed."""
        step, self._pending = self._pending, None
        expert_load, self._pending_load = self._pending_load, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(step, err) from err
        if step is None or jax.process_index() != 0:
            return
        try:
            if expert_load is not None:
                save_expert_load(self.directory / str(step) / EXPERT_LOAD_FILE, expert_load)
            write_manifest(self.directory / str(step), step)
        except Exception as err:
            raise CheckpointError(
                f"writing the expert load and checksums of checkpoint {step} in {self.directory} failed ({first_line(err)}); "
                "a resumed run takes that step as corrupt. Free space or fix the directory, then run "
                "the same command again to resume"
            ) from err

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _split_extra(state: Any) -> tuple[Any, Any]:
    """(a `TrainState`'s fields but `extra`, as a dict; `extra` when it holds arrays, else None):
    a state without objective state is saved exactly as before `extra` existed.  Any other
    pytree is saved as it is."""
    if not isinstance(state, TrainState):
        return state, None
    core = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "extra"}
    return core, (state.extra if jax.tree.leaves(state.extra) else None)


def abstract_with_shardings(state_shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings, for `Checkpointer.restore`."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings
    )
