"""Token log-likelihoods of windows under a model on a mesh: the one jitted forward that
perplexity, the task harness and the lm-eval adapter share.

For a packed batch [B, T] (`windows.pack_rows`) one step returns, per position,
    logprob[b, t] = log softmax(z[b, t])[y[b, t]]         (fp32)
    greedy[b, t]  = argmax_v z[b, t, v] == y[b, t]
replicated on every device, so every process reads the whole batch (`runtime.logprobs`: the
forward post-training shares, over vocabulary chunks).  Rows are split into
batches of `batch_size`; the last batch is filled with padding rows (segment 0) and their
outputs ignored, so every window is scored whatever the batch size.  Sums are taken on the host
in float64 in window order, so figures do not depend on the mesh layout.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from tqdm.auto import tqdm

from frontier_jax.eval.windows import Window, pack_rows
from frontier_jax.parallel.mesh import batch_sharding
from frontier_jax.runtime.logprobs import BATCH_KEYS, logprob_step
from frontier_jax.runtime.program import ModelProgram


def batch_split(program: ModelProgram) -> int:
    """How many ways the mesh splits the batch (the product of the `batch` rule's mesh axes)."""
    return math.prod(program.mesh.shape[a] for a in program.rules["batch"] if a in program.mesh.shape)


class Scorer:
    """`score(windows)` -> per window (logprob [L] float32, greedy [L] bool) numpy arrays."""

    def __init__(
        self,
        program: ModelProgram,
        params: dict,
        biases: dict,
        *,
        context: int,
        batch_size: int,
        pad_id: int = 0,
        progress: bool = True,
    ):
        if program.mesh is None:
            raise ValueError("Scorer needs a model program on a mesh (runtime.build_model_program)")
        ways = batch_split(program)
        if batch_size % ways:
            raise ValueError(
                f"eval.batch_size={batch_size} is not divisible by the {ways}-way batch split of "
                f"the mesh {dict(program.mesh.shape)}; use a multiple of {ways}"
            )
        self.program, self.params, self.biases = program, params, biases
        self.context, self.batch_size, self.pad_id, self.progress = context, batch_size, pad_id, progress
        self._in = batch_sharding(program.mesh, program.rules)
        self._step = logprob_step(program)  # the forward post-training shares

    def _assemble(self, host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, self._in, lambda index: host[index])

    def score(self, windows: list[Window], desc: str = "eval") -> list[tuple[np.ndarray, np.ndarray]]:
        if not windows:
            return []
        rows = pack_rows(windows, self.context, self.pad_id)
        n_rows = len(rows.input_ids)
        n_batches = -(-n_rows // self.batch_size)
        logprob = np.zeros((n_batches * self.batch_size, self.context), np.float32)
        greedy = np.zeros(logprob.shape, bool)
        bar = tqdm(
            total=n_batches,
            desc=desc,
            unit="batch",
            dynamic_ncols=True,
            disable=not self.progress or jax.process_index() != 0,
        )
        for k in range(n_batches):
            sl = slice(k * self.batch_size, (k + 1) * self.batch_size)
            batch = {}
            for key in BATCH_KEYS:
                block = np.full(
                    (self.batch_size, self.context),
                    self.pad_id if key in ("input_ids", "targets") else 0,
                    np.int32,
                )
                part = getattr(rows, key)[sl]
                block[: len(part)] = part
                batch[key] = self._assemble(block)
            lp, gr = self._step(self.params, self.biases, batch)
            logprob[sl] = np.asarray(lp.addressable_data(0))
            greedy[sl] = np.asarray(gr.addressable_data(0))
            bar.update(1)
        bar.close()
        return [
            (logprob[row, start : start + len(w.input_ids)], greedy[row, start : start + len(w.input_ids)])
            for w, (row, start) in zip(windows, rows.placement)
        ]
