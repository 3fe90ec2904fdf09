"""Checkpoints with orbax-checkpoint's CheckpointManager.

Each checkpoint step holds three items:
    state   the train state pytree (params, biases, optimizer, step, rng)   StandardSave
    data    the input iterator's state (JSON, one file per process)         grain's handler
    config  the resolved run config (JSON)                                   JsonSave
Saves are asynchronous and atomic (orbax writes into a temporary directory and renames it
when complete, so a crash mid-save leaves the previous checkpoint as the latest).  Restore
takes an abstract state whose leaves carry the *current* shardings, so a checkpoint written
on one mesh restores onto another (e.g. 8 devices -> 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from frontier_jax.config import CheckpointConfig
from frontier_jax.data.checkpoint import orbax_restore_args, orbax_save_args


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_same_model(saved: dict, current: dict, directory: Path) -> None:
    """Raises if the checkpoint's model config differs from the current one (names fields)."""
    saved_model, current_model = _flatten(saved.get("model", {})), _flatten(current.get("model", {}))
    implementation = {"attention_impl", "moe_dispatch", "moe_capacity_factor", "gmm_impl", "remat_policy"}
    diffs = [f"model.{k}: checkpoint {saved_model.get(k)!r} vs config {current_model.get(k)!r}"
             for k in sorted(set(saved_model) | set(current_model))
             if k not in implementation and k != "name" and saved_model.get(k) != current_model.get(k)]
    if diffs:
        raise ValueError(f"checkpoint directory {directory} holds a different model:\n  " + "\n  ".join(diffs)
                         + "\nuse a new --run-dir, or the config the checkpoint was written with")


class Checkpointer:
    def __init__(self, directory: str | Path, cfg: CheckpointConfig):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=orbax_save_args(data_iterator),
            config=ocp.args.JsonSave(config)), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
        """Returns the state laid out as `abstract_state` (a pytree of ShapeDtypeStructs with
        `sharding` set) and moves `data_iterator` to the saved position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=orbax_restore_args(data_iterator)))
        return restored.state

    def read_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(state_shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings, for `Checkpointer.restore`."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        state_shapes, shardings)
