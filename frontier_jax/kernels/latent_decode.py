"""Paged latent attention for absorbed-MLA decode, in Pallas (Triton lowering on GPUs, the
Pallas interpreter elsewhere): a FlashMLA-style kernel that reads the paged cache in place.

For one layer's pool c [L, N, P, d_c], k^R [L, N, P, d_h^R] (N blocks of P tokens), a row's
block table tab [M] and a query at position p with per-head latent query q~ [H, d_c] and rope
query q^R [H, d_h^R]:

    s_{h,j} = scale (q~_h . c_j + q^R_h . k^R_j)                      keys j = 0 .. p
    o~_h    = sum_j softmax_j(s_h) c_j                                 [H, d_c]

where key j lives in block tab[j // P] at offset j % P.  The XLA path (`model.attention.
latent_attention`) first gathers every row's blocks into a contiguous [B, M P, d_c] copy and
scores all M P slots; here each program walks only the blocks up to p, straight from the pool,
with an online softmax (running max m, normaliser l, accumulator [H, d_c] in fp32), so a step
reads each cached latent once.

Flash-decoding split: with few rows the (row, query) grid cannot fill the GPU, so the blocks of
a row are cut into S contiguous ranges, one program each, and the partial results combine as
    o~ = sum_s exp(m_s - m) acc_s / sum_s exp(m_s - m) l_s,    m = max_s m_s.
Heads are padded to a multiple of 16 (Triton's smallest dot tile).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from frontier_jax.kernels.lowering import interpret

_MIN_DOT = 16  # Triton's smallest dot dimension
_NEG = -1e30  # finite "minus infinity": a split without keys keeps m = _NEG and weight 0


def default_splits(rows: int, max_blocks: int, programs: int = 128) -> int:
    """S: enough programs for about `programs` in flight (an H200 has 132 SMs), at most one
    block per split."""
    return max(1, min(max_blocks, programs // max(rows, 1)))


def _kernel(layer_ref, pos_ref, table_ref, q_ref, qr_ref, c_ref, kr_ref, acc_ref, m_ref, l_ref, *, scale):
    """Program (b, t, s): the blocks of split s of row b for query t (module docstring)."""
    b, t, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    splits = pl.num_programs(2)
    layer = layer_ref[0]
    pos = pos_ref[b, t]
    block = c_ref.shape[2]
    used = pos // block + 1  # blocks holding keys 0 .. pos
    per_split = (table_ref.shape[1] + splits - 1) // splits
    start = s * per_split
    stop = jnp.minimum(start + per_split, used)
    q = q_ref[0, 0]  # [H, d_c]
    qr = qr_ref[0, 0]  # [H, d_h^R]
    heads, width = q.shape

    def step(i, carry):
        m, norm, acc = carry
        blk = table_ref[b, i]
        c = c_ref[layer, blk]  # [P, d_c]
        kr = kr_ref[layer, blk]  # [P, d_h^R]
        nt = (((1,), (1,)), ((), ()))
        scores = jax.lax.dot_general(q, c, nt, preferred_element_type=jnp.float32)
        scores += jax.lax.dot_general(qr, kr, nt, preferred_element_type=jnp.float32)
        keys = i * block + jax.lax.broadcasted_iota(jnp.int32, (heads, block), 1)
        scores = jnp.where(keys <= pos, scores * scale, _NEG)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.exp(scores - m_new[:, None])
        correction = jnp.exp(m - m_new)
        norm = norm * correction + p.sum(axis=1)
        acc = acc * correction[:, None] + jax.lax.dot_general(
            p.astype(c.dtype), c, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return m_new, norm, acc

    init = (
        jnp.full((heads,), _NEG, jnp.float32),
        jnp.zeros((heads,), jnp.float32),
        jnp.zeros((heads, width), jnp.float32),
    )
    m, norm, acc = jax.lax.fori_loop(start, jnp.maximum(start, stop), step, init)
    acc_ref[0, 0, 0] = acc
    m_ref[0, 0, 0] = m
    l_ref[0, 0, 0] = norm


@functools.partial(jax.jit, static_argnames=("scale", "splits"))
def paged_latent_attention(
    q_latent: jax.Array,
    q_rope: jax.Array,
    c_kv: jax.Array,
    k_rope: jax.Array,
    layer: jax.Array,
    block_table: jax.Array,
    positions: jax.Array,
    *,
    scale: float,
    splits: int | None = None,
) -> jax.Array:
    """q_latent [B, T, H, d_c], q_rope [B, T, H, d_h^R], the pool c_kv [L, N, P, d_c] and
    k_rope [L, N, P, d_h^R], layer (int scalar), block_table [B, M] int32, positions [B, T]
    int32 -> o~ [B, T, H, d_c] in q_latent's dtype (module docstring).  splits: S (None:
    `default_splits`)."""
    b, t, heads, width = q_latent.shape
    rope = q_rope.shape[-1]
    if not interpret() and c_kv.shape[2] % _MIN_DOT:
        raise ValueError(
            f"paged latent attention: cache blocks of {c_kv.shape[2]} tokens; the Triton kernel needs a "
            f"multiple of {_MIN_DOT}: set infer.block_size to one (default 64)"
        )
    blocks = block_table.shape[1]
    splits = splits or default_splits(b * t, blocks)
    padded = -(-heads // _MIN_DOT) * _MIN_DOT
    if padded != heads:
        pad = [(0, 0), (0, 0), (0, padded - heads), (0, 0)]
        q_latent, q_rope = jnp.pad(q_latent, pad), jnp.pad(q_rope, pad)
    dtype = c_kv.dtype
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j, s: (0,) * x.ndim)  # noqa: E731
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    operands = (
        layer,
        positions.astype(jnp.int32),
        block_table.astype(jnp.int32),
        q_latent.astype(dtype),
        q_rope.astype(dtype),
        c_kv,
        k_rope,
    )
    in_specs = [whole(x) for x in operands[:3]] + [
        pl.BlockSpec((1, 1, padded, width), lambda i, j, s: (i, j, 0, 0)),
        pl.BlockSpec((1, 1, padded, rope), lambda i, j, s: (i, j, 0, 0)),
        whole(c_kv),
        whole(k_rope),
    ]
    acc, m, norm = pl.pallas_call(
        functools.partial(_kernel, scale=scale),
        out_shape=(
            jax.ShapeDtypeStruct((b, t, splits, padded, width), jnp.float32),
            jax.ShapeDtypeStruct((b, t, splits, padded), jnp.float32),
            jax.ShapeDtypeStruct((b, t, splits, padded), jnp.float32),
        ),
        grid=(b, t, splits),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((1, 1, 1, padded, width), lambda i, j, s: (i, j, s, 0, 0)),
            pl.BlockSpec((1, 1, 1, padded), lambda i, j, s: (i, j, s, 0)),
            pl.BlockSpec((1, 1, 1, padded), lambda i, j, s: (i, j, s, 0)),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret(),
        name="paged_latent_attention",
    )(*operands)
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # [B, T, S, H]
    out = (weight[..., None] * acc).sum(2) / (weight * norm).sum(2)[..., None]
    return out[:, :, :heads].astype(q_latent.dtype)
