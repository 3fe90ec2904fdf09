"""New parameters onto an engine's layout (`Engine.load_weights`): each array cast to the dtype of
the one it replaces and placed with its sharding.  Compiled programs are keyed by the shapes,
dtypes and shardings of their inputs (and the model's graph), so every step runs on as compiled.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import traverse_util


def _path(keys: tuple) -> str:
    return ".".join(map(str, keys))


def swap_weights(current: dict, params: dict, biases: dict) -> dict:
    """The pure-dict model state `current` with every leaf replaced by the one at its path in
    `params` or `biases` (pure dicts, e.g. a train state's), cast and placed like the leaf it
    replaces.  A missing, extra or differently shaped parameter is a one-line error."""
    old = traverse_util.flatten_dict(current)
    new = {**traverse_util.flatten_dict(params), **traverse_util.flatten_dict(biases)}
    missing, extra = sorted(set(old) - set(new), key=str), sorted(set(new) - set(old), key=str)
    if missing or extra:
        what = (
            f"{_path(missing[0])} is missing"
            if missing
            else f"{_path(extra[0])} is not in the engine's model"
        )
        raise ValueError(
            f"load_weights: parameter {what} ({len(missing)} missing, {len(extra)} unknown): give the "
            "params and expert biases of the same model config as the engine's"
        )
    placed = {}
    for path, leaf in old.items():
        value = new[path]
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(
                f"load_weights: {_path(path)} has shape {tuple(value.shape)}, the engine's {tuple(leaf.shape)}"
            )
        if not isinstance(value, jax.Array):
            value = np.asarray(value, leaf.dtype)
        elif value.dtype != leaf.dtype:
            value = value.astype(leaf.dtype)
        placed[path] = jax.device_put(value, leaf.sharding)
    return traverse_util.unflatten_dict(placed)
