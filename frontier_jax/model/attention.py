"""The attention core, softmax(scale q k^T + mask) v, behind one interface.

Implementations (chosen by `impl.attention`):
  * "xla":   explicit einsums with an fp32 softmax; runs everywhere, the reference.
  * "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, the fused flash kernel on
             NVIDIA GPUs.  cuDNN needs equal q/k and v head dims, so v is zero-padded to the
             q/k head dim and the output sliced back (exact: padded columns contribute zeros).

Mask: query i may attend to key j iff j <= i + q_offset (causal, with q_offset the number of
cached positions before the first query) and, when segment ids are given, iff both tokens
belong to the same non-padding segment (packed documents never see each other).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.kernels.latent_decode import paged_latent_attention
from frontier_jax.model.latent_cache import LatentCache, read_latent
from frontier_jax.ops.tokamax_import import tokamax

_MASKED = -1e30  # finite, so that a fully masked (padding) row yields no NaN


def attention_mask(
    q_len: int,
    kv_len: int,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """Boolean mask [B or 1, 1, T, S]: True where query i may attend to key j.  q_offset is a
    scalar or one offset per row [B] (rows of a chunked prefill that start at different positions)."""
    q_idx = jnp.arange(q_len)[None, :, None] + jnp.reshape(q_offset, (-1, 1, 1))
    kv_idx = jnp.arange(kv_len)[None, None, :]
    mask = (kv_idx <= q_idx)[:, None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = mask & (same & (kv_segment_ids[:, None, :] != 0))[:, None]
    return mask


def _xla_attention(q, k, v, mask, scale):
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v)


def _kernel_mask(q, k, q_segment_ids, kv_segment_ids, q_offset) -> dict:
    """Mask arguments for the flash kernels: their built-in causal mask for plain causal
    self-attention, an explicit boolean mask otherwise (documents, decode offsets)."""
    if q_segment_ids is None and isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]:
        return {"is_causal": True}
    return {"mask": attention_mask(q.shape[1], k.shape[1], q_segment_ids, kv_segment_ids, q_offset)}


def _cudnn_attention(q, k, v, scale, mask_args):
    dv = v.shape[-1]
    if dv < q.shape[-1]:
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv)))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn", **mask_args)
    return out[..., :dv]


def chunk_attention(
    q: jax.Array,
    new: tuple[jax.Array, jax.Array],
    prefix: tuple[jax.Array, jax.Array],
    *,
    new_lengths: jax.Array,
    prefix_lengths: jax.Array,
    scale: float,
    implementation: str = "cudnn",
) -> jax.Array:
    """Attention of a prefill chunk over its cached prefix and itself, in two flash calls that each
    keep the kernel's own masks (a cascade): queries q [B, T, H, Dqk] of the chunk's tokens at
    positions o_b .. o_b + T - 1 (o_b = prefix_lengths[b]; the first new_lengths[b] are real),
        A: over the chunk's own keys/values new = (k [B, T, H, Dqk], v [B, T, H, Dv]), causal;
        B: over prefix = (k [B, S, H, Dqk], v [B, S, H, Dv]), keys j < o_b only, no causal mask;
        o = (e^(l_A - m) o_A + e^(l_B - m) o_B) / (e^(l_A - m) + e^(l_B - m)),  m = max(l_A, l_B)
    with l the log-sum-exp of each part's scores per query and head (B is left out where o_b = 0).
    This equals one attention over [prefix; chunk] with the causal offset mask
    (`attention_mask(q_offset=o)`), but the kernel skips the blocks that mask would hide instead
    of scoring all T x S pairs.  -> [B, T, H, Dv] in v's dtype; padding queries give 0.
    implementation: `jax.nn.dot_product_attention`'s ("cudnn" on GPUs; "xla" for the CPU tests)."""
    (k_new, v_new), (k_prefix, v_prefix) = new, prefix
    dv = v_new.shape[-1]

    def attend(k, v, **lengths):
        if dv < q.shape[-1]:  # jax.nn.dot_product_attention wants equal head dims: pad v (exact)
            v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - dv)))
        out, lse = jax.nn.dot_product_attention(
            q, k, v, scale=scale, implementation=implementation, return_residual=True, **lengths
        )
        return out[..., :dv].astype(jnp.float32), lse.astype(jnp.float32)  # [B, T, H, Dv], [B, T, H]

    o_a, l_a = attend(
        k_new, v_new, is_causal=True, query_seq_lengths=new_lengths, key_value_seq_lengths=new_lengths
    )
    o_b, l_b = attend(k_prefix, v_prefix, key_value_seq_lengths=jnp.maximum(prefix_lengths, 1))
    has_prefix = (prefix_lengths > 0)[:, None, None]
    m = jnp.where(has_prefix, jnp.maximum(l_a, l_b), l_a)
    w_a = jnp.exp(l_a - m)
    w_b = jnp.where(has_prefix, jnp.exp(l_b - m), 0.0)
    out = (w_a[..., None] * o_a + w_b[..., None] * o_b) / (w_a + w_b)[..., None]
    real = jnp.arange(q.shape[1])[None, :] < new_lengths[:, None]
    return jnp.where(real[:, :, None, None] & jnp.isfinite(out), out, 0.0).astype(v_new.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    impl: str = "xla",
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    q_offset: int | jax.Array = 0,
) -> jax.Array:
    """q [B, T, H, Dqk], k [B, S, H, Dqk], v [B, S, H, Dv] -> [B, T, H, Dv] in v's dtype.

    q_segment_ids [B, T] / kv_segment_ids [B, S]: document ids (0 = padding) or None for plain
    causal attention over the whole row."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if impl == "xla":
        mask = attention_mask(q.shape[1], k.shape[1], q_segment_ids, kv_segment_ids, q_offset)
        return _xla_attention(q, k, v, mask, scale)
    mask_args = _kernel_mask(q, k, q_segment_ids, kv_segment_ids, q_offset)
    if impl == "cudnn":
        return _cudnn_attention(q, k, v, scale, mask_args)
    if impl == "tokamax":
        return tokamax("impl.attention").dot_product_attention(q, k, v, scale=scale, **mask_args)
    raise ValueError(f"impl.attention={impl!r} is unknown; allowed: xla, cudnn, tokamax")


def latent_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    c_kv: jax.Array,
    k_rope: jax.Array,
    *,
    scale: float,
    positions: jax.Array,
) -> jax.Array:
    """Attention of per-head queries over a latent shared by all heads (absorbed MLA decode):

        s_{t,h,j} = scale (q~_{t,h} . c_j + q^R_{t,h} . k^R_j),   o~_{t,h} = sum_j softmax_j(s) c_j

    q_latent [B, T, H, d_c], q_rope [B, T, H, d_h^R], c_kv [B, S, d_c], k_rope [B, S, d_h^R]
    -> o~ [B, T, H, d_c] in q_latent's dtype.  Key j is the token at position j; query t at
    positions [B, T] sees keys j <= positions[b, t].  Einsums with an fp32 softmax: the reference."""
    logits = (
        jnp.einsum("bthc,bsc->bhts", q_latent, c_kv, preferred_element_type=jnp.float32)
        + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, preferred_element_type=jnp.float32)
    ) * scale
    mask = jnp.arange(c_kv.shape[1])[None, None, None, :] <= positions[:, None, :, None]
    probs = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    return jnp.einsum("bhts,bsc->bthc", probs, c_kv.astype(jnp.float32)).astype(q_latent.dtype)


def cached_latent_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    cache: LatentCache,
    layer,
    block_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    impl: str = "xla",
) -> jax.Array:
    """`latent_attention` over layer `layer` of the paged cache, for the rows of block_table
    [B, M] (`latent_cache.py`).  Implementations (`infer.decode_attention_impl`):
      "xla":    gathers each row's M blocks into [B, M P, d_c] and scores every slot;
      "pallas": `kernels.latent_decode`, which reads only the blocks up to each query's
                position, in place (Triton on GPUs, the Pallas interpreter elsewhere)."""
    if impl == "xla":
        c_kv, k_rope = read_latent(cache, layer, block_table)
        dtype = q_latent.dtype
        return latent_attention(
            q_latent, q_rope, c_kv.astype(dtype), k_rope.astype(dtype), scale=scale, positions=positions
        )
    if impl == "pallas":
        return paged_latent_attention(
            q_latent, q_rope, cache.c_kv, cache.k_rope, layer, block_table, positions, scale=scale
        ).astype(q_latent.dtype)
    raise ValueError(f"infer.decode_attention_impl={impl!r} is unknown; allowed: xla, pallas")
