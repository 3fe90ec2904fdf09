"""The attention core, softmax(scale q k^T + mask) v, behind one interface.

Implementations (chosen by `model.attention_impl`):
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

from frontier_jax.model.tokamax_import import tokamax

_MASKED = -1e30  # finite, so that a fully masked (padding) row yields no NaN


def attention_mask(q_len: int, kv_len: int, q_segment_ids: jax.Array | None,
                   kv_segment_ids: jax.Array | None, q_offset: int | jax.Array = 0) -> jax.Array:
    """Boolean mask [B or 1, 1, T, S]: True where query i may attend to key j."""
    q_idx = jnp.arange(q_len)[:, None] + q_offset
    kv_idx = jnp.arange(kv_len)[None, :]
    mask = (kv_idx <= q_idx)[None, None]
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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          impl: str = "xla", q_segment_ids: jax.Array | None = None,
                          kv_segment_ids: jax.Array | None = None,
                          q_offset: int | jax.Array = 0) -> jax.Array:
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
        return tokamax("model.attention_impl").dot_product_attention(q, k, v, scale=scale, **mask_args)
    raise ValueError(f"model.attention_impl={impl!r} is unknown; allowed: xla, cudnn, tokamax")
