"""Reward-model training: the Bradley-Terry preference objective on a scalar head.

Rows 2i and 2i + 1 of a batch are the chosen and the rejected side of pair i (one sequence
each, `data.preferences.pair_rows`); the scalar head reads r at each row's last token
(`model.reward`).  Per pair, with margin m and centring coefficient c (`train.preference`):

    l_i = -log sigmoid(r_c - r_r - m) + c (r_c + r_r)^2 = softplus(-(r_c - r_r - m)) + c (r_c + r_r)^2
    L   = sum_i l_i / P,      P = the pairs of the whole global batch

The centring term keeps the rewards near zero mean (their scale is otherwise free).  A pair's
two rows must sit in one micro-batch: global_batch / micro_batches is even (checked by
`TrainConfig.validate`).  Reported: bt_loss (the mean of the first term), accuracy (share of
pairs with r_c > r_r), reward_margin (mean r_c - r_r).  The MoE layers' expert loads feed the
loss-free bias update as in pre-training; no balance loss is added.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.train.config import TrainConfig

BATCH_SPEC: dict[str, np.dtype] = {
    "input_ids": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "margin": np.dtype(np.float32),
}


def bradley_terry(chosen: jax.Array, rejected: jax.Array, margin: jax.Array, centring: float):
    """Per-pair (-log sigmoid(r_c - r_r - m), c (r_c + r_r)^2), each [P] fp32."""
    return jax.nn.softplus(-(chosen - rejected - margin)), centring * (chosen + rejected) ** 2


class Preference:
    """The objective of `train.objective: preference` (module docstring)."""

    batch_spec = BATCH_SPEC

    def __init__(self, train: TrainConfig, model: ModelConfig):
        if str(model.head) != "scalar":
            raise ValueError(
                f"train.objective=preference trains a reward model, which reads a scalar head; model.head={model.head}: "
                "set model.head=scalar model.mtp_depth=0 (start it from an LM run with train.init_from)"
            )
        self.centring = train.preference.centring

    def prepare(self, batch: Mapping[str, jax.Array], extra: Any) -> dict:
        return dict(batch)

    def normalisers(self, batch: dict, micro_batches: int) -> dict:
        return {"pairs": jnp.float32(batch["input_ids"].shape[0] // 2)}

    def rewards(self, model: Transformer, mb: dict) -> tuple[jax.Array, Any]:
        """(r [B] fp32 at each row's last token, the model's hidden output)."""
        out = model.hidden(mb["input_ids"], mb["positions"], mb["segment_ids"], with_mtp=False)
        values, _ = model.output_head().segment_values(out.hidden, mb["segment_ids"], 1)
        return values[:, 0], out

    def __call__(self, model: Transformer, mb: dict, norm: dict) -> tuple[jax.Array, dict, dict]:
        r, out = self.rewards(model, mb)
        chosen, rejected = r[0::2], r[1::2]
        nll, centring = bradley_terry(chosen, rejected, mb["margin"][0::2], self.centring)
        metrics = {
            "bt_sum": nll.sum(),
            "correct": jnp.sum(chosen > rejected).astype(jnp.float32),
            "margin_sum": jnp.sum(chosen - rejected),
        }
        return (nll.sum() + centring.sum()) / norm["pairs"], metrics, model.expert_loads(out)

    def summarize(self, metrics: dict, norm: dict) -> dict:
        pairs = norm["pairs"]
        return {
            "bt_loss": metrics["bt_sum"] / pairs,
            "accuracy": metrics["correct"] / pairs,
            "reward_margin": metrics["margin_sum"] / pairs,
            "pairs": pairs,
        }
