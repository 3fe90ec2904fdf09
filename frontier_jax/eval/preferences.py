"""A reward model's held-out pairwise accuracy: `frontier-jax eval --checkpoint RUN --preferences FILE`.

Every pair of FILE (`data.preferences`, rendered by the model's chat template) is scored by the
scalar head at the last token of each side; over the P pairs,

    accuracy     = (1/P) #{r_chosen > r_rejected}
    mean_margin  = (1/P) sum (r_chosen - r_rejected)

Rows are scored `batch_size` at a time, padded to one length (one compiled program).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from frontier_jax.data.preferences import PreferencePair, pair_rows, read_preferences
from frontier_jax.data.template import ChatTemplate
from frontier_jax.eval.model import EvalModel


def pair_rewards(model: EvalModel, pairs: list[PreferencePair], batch_size: int) -> np.ndarray:
    """[P, 2] float64: (r_chosen, r_rejected) of each pair; batch_size: rows per forward (even)."""
    head = str(model.program.cfg.model.head)
    if head != "scalar":
        raise ValueError(
            f"eval --preferences scores a reward model (model.head=scalar); {model.source} has model.head={head}"
        )
    length = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    length = -(-length // 16) * 16
    per_batch = max(batch_size // 2, 1)
    values = jax.jit(lambda p, b, ids, pos, seg: model.program.model(p, b).values(ids, pos, seg)[0][:, 0])
    out = []
    for start in range(0, len(pairs), per_batch):
        chunk = pairs[start : start + per_batch]
        padded = chunk + [chunk[-1]] * (per_batch - len(chunk))  # one shape; the copies are dropped
        rows = pair_rows(padded, length, model.tokenizer.pad_id)
        r = np.asarray(
            values(model.params, model.biases, rows["input_ids"], rows["positions"], rows["segment_ids"]),
            np.float64,
        )
        out.append(r.reshape(-1, 2)[: len(chunk)])
    return np.concatenate(out)


def evaluate_preferences(model: EvalModel, path: str | Path, batch_size: int) -> dict:
    """{"pairs", "accuracy", "mean_margin"} of the pairs in `path` (module docstring)."""
    template = ChatTemplate.of_tokenizer(model.tokenizer.origin)
    pairs = read_preferences(
        path, model.tokenizer, template, max_len=model.program.cfg.model.max_position_embeddings
    )
    r = pair_rewards(model, pairs, batch_size)
    margin = r[:, 0] - r[:, 1]
    return {
        "pairs": len(pairs),
        "accuracy": float(np.mean(margin > 0)),
        "mean_margin": float(np.mean(margin)),
    }
