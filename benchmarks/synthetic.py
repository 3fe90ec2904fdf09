"""Synthetic training batches for benchmarks: uniform random tokens, one document per row."""

from __future__ import annotations

import numpy as np


def synthetic_batches(vocab: int, batch: int, seq: int, count: int = 1, seed: int = 0) -> list[dict]:
    """`count` batches of the train-step layout (input_ids, targets, loss_mask, segment_ids,
    positions), each [batch, seq] int32."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)
        out.append(
            {
                "input_ids": ids[:, :-1],
                "targets": ids[:, 1:],
                "loss_mask": np.ones((batch, seq), np.int32),
                "segment_ids": np.ones((batch, seq), np.int32),
                "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            }
        )
    return out
