"""The scalar head of a reward / value model (`model.head: scalar`).

The trunk and the final norm are the language model's; the head reads one value per sequence:

    v_s = g_{t_s} . w                  w [d] (kernel [d, 1], fp32)

with g [B, T, d] the final-normed hidden state and t_s the last token of sequence s.  A packed row
holds several sequences (segment ids 1, 2, ..., S; 0 = padding, `data.packing`): sequence s of
row b is read at t_s = max {t : segment_ids[b, t] = s}, the one position whose causal attention
(within its document) has seen the whole sequence.  Without segment ids a row is one sequence
read at its last position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.model.layers import normal_param


def segment_ends(segment_ids: jax.Array, segments: int) -> tuple[jax.Array, jax.Array]:
    """segment_ids [B, T] (1..S, 0 padding) -> (t_s [B, S] int32: the last position of segment
    s + 1 of each row (0 where absent), present [B, S] bool)."""
    t = segment_ids.shape[1]
    hit = segment_ids[:, None, :] == jnp.arange(1, segments + 1, dtype=segment_ids.dtype)[None, :, None]
    present = hit.any(-1)
    last = jnp.where(hit, jnp.arange(t, dtype=jnp.int32), -1).max(-1)
    return jnp.where(present, last, 0).astype(jnp.int32), present


class ScalarHead(nnx.Module):
    """w [d] as a kernel [d, 1] (logical axes ("embed", "score")): g [..., d] -> g . w [...] in fp32."""

    def __init__(self, dim: int, *, std: float, rngs: nnx.Rngs):
        self.kernel = normal_param(rngs, (dim, 1), ("embed", "score"), std)

    def __call__(self, g: jax.Array) -> jax.Array:
        return jnp.einsum("...d,dk->...k", g.astype(jnp.float32), self.kernel[...])[..., 0]

    def segment_values(
        self, g: jax.Array, segment_ids: jax.Array | None, segments: int
    ) -> tuple[jax.Array, jax.Array]:
        """g [B, T, d] -> (v [B, S] fp32: the value of each row's segment s + 1 at its last token,
        0 where absent; present [B, S] bool).  segment_ids None: one sequence per row (S = 1)."""
        if segment_ids is None:
            b, t = g.shape[:2]
            ends, present = jnp.full((b, 1), t - 1, jnp.int32), jnp.ones((b, 1), bool)
        else:
            ends, present = segment_ends(segment_ids, segments)
        last = jnp.take_along_axis(g, ends[..., None], axis=1)  # [B, S, d]
        return jnp.where(present, self(last), 0.0), present
