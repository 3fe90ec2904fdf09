"""Per-token log-probabilities of given targets under a model program, on its mesh.

For a batch [B, T] (input_ids, targets, positions, segment_ids: packed documents, 0 = padding)

    logprob[b, t] = log softmax(z[b, t] / T)[y[b, t]]   (fp32),   greedy[b, t] = argmax_v z[b, t, v] == y[b, t]

with z = OutHead(g) the LM head on the final-normed hidden state g and T a sampling temperature
(default 1: the model's own distribution; post-training scores rollouts drawn at T).  The [B, T, V] logits are
never formed: the head reads g in vocabulary chunks (`model.logprobs.chunked_target_logprobs`),
so scoring and post-training (reference and policy log-probabilities) cost [B, T, V / n] at a
time whatever the vocabulary.  `sequence_logprobs` is the traceable (and differentiable) form an
objective calls inside its step; `logprob_step` the one jitted forward that evaluation
(`eval.Scorer`) and post-training share.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from frontier_jax.model import Transformer
from frontier_jax.runtime.program import ModelProgram

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids")
VOCAB_CHUNK = 8192  # columns of the head read at a time


def sequence_logprobs(
    model: Transformer,
    batch: Mapping[str, jax.Array],
    *,
    vocab_chunk: int = VOCAB_CHUNK,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """(logprob [B, T] fp32, greedy [B, T] bool) of `batch`'s targets (module docstring); with
    batch["routed_experts"] [B, T, L_moe, K] the MoE layers replay those experts
    (`Transformer.hidden`)."""
    g = model.hidden(
        batch["input_ids"],
        batch["positions"],
        batch["segment_ids"],
        with_mtp=False,
        routed_experts=batch.get("routed_experts"),
    ).hidden
    stats = model.output_head().token_stats(g, batch["targets"], chunk=vocab_chunk, temperature=temperature)
    return stats.logprob, stats.argmax == batch["targets"]


def logprob_step(
    program: ModelProgram, *, vocab_chunk: int = VOCAB_CHUNK, temperature: float = 1.0
) -> Callable:
    """The jitted (params, biases, batch) -> (logprob, greedy) [B, T] of `program`'s model on its
    mesh, at temperature T: the batch sharded as it is given, the outputs replicated (every process
    reads them whole).  Raises ValueError for a model without an LM head (model.head=scalar)."""
    program.require_lm_head("per-token log-probabilities")
    if program.mesh is None:
        raise ValueError(
            "per-token log-probabilities need a model program on a mesh (runtime.build_model_program)"
        )

    def forward(params: dict, biases: dict, batch: Mapping[str, jax.Array]):
        with program.sharding_context():
            logprob, greedy = sequence_logprobs(
                program.model(params, biases), batch, vocab_chunk=vocab_chunk, temperature=temperature
            )
        return logprob.astype(jnp.float32), greedy

    replicated = NamedSharding(program.mesh, PartitionSpec())
    return jax.jit(forward, out_shardings=(replicated, replicated))
