"""Training objectives (all in fp32).

Next-token cross-entropy over tokens with mask m:
    L_CE = sum_t m_t (logsumexp(z_t) - z_t[y_t]) / N,     N = normaliser (token count)
z-loss (optional):  L_z = sum_t m_t logsumexp(z_t)^2 / N
MTP (V3 eq. 24-25): depth k predicts y_{t+k} (= token t+k+1) from position t:
    L_MTP = (1/D) sum_k L_CE^k,  L_CE^k over positions whose target is inside the row (and,
    with document masking, inside the same document) and not loss-masked.
Losses are returned as SUMS with their token counts so that gradient accumulation can divide
by the count of the whole global batch (exactly equal to one large batch).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.model.logprobs import target_logprobs


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V], targets [...] -> (CE = -log p(target) [...], logsumexp [...]) in fp32."""
    logprob, lse = target_logprobs(logits, targets)
    return -logprob, lse


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(values * mask.astype(jnp.float32))


def mtp_targets(
    targets: jax.Array, loss_mask: jax.Array, segment_ids: jax.Array | None, depth: int
) -> tuple[jax.Array, jax.Array]:
    """Targets and mask [D, B, T] for MTP depths k = 1..D: target_k[t] = targets[t + k]."""
    b, t = targets.shape
    pos = jnp.arange(t)
    out_targets, out_masks = [], []
    for k in range(1, depth + 1):
        shifted = jnp.roll(targets, -k, axis=1)
        mask = jnp.roll(loss_mask, -k, axis=1) * (pos < t - k)[None, :]
        if segment_ids is not None:
            mask = mask * (jnp.roll(segment_ids, -k, axis=1) == segment_ids)
        out_targets.append(shifted)
        out_masks.append(mask)
    return jnp.stack(out_targets), jnp.stack(out_masks).astype(jnp.int32)
