"""Blockwise-scaled fp8 GEMMs in Pallas (Triton lowering on GPUs, the Pallas interpreter
elsewhere), all in "NT" form: both operands contract on their LAST dim, which Hopper's fp8
tensor-core instruction needs (both operands K-major).

With the contraction split into CHUNK = 128-wide chunks c (the DeepSeek-V3 scale block),

    dense         out[m, n]    = sum_c sa[m, c] sb[n, c] (sum_{k in c} a[m, k] b[n, k])
    grouped rows  out[r, n]    = same, with b = W[g(r)] (forward and input gradient)
    weight grad   out[g, k, n] = sum_{t in g} sa[k, t] sb[n, t] (sum_{r in t} a[k, r] b[n, r])
                  (a = x^T, b = dy^T; t: g's 128-row tiles, the chunks of this contraction)

where every chunk's fp8 x fp8 product is accumulated in fp32 by the tensor cores, scaled by
its two scales and added into an fp32 accumulator (what `precision.gemm`'s XLA reference
computes).  Operand dtypes are fp8 (e4m3 or e5m2); two different fp8 formats are multiplied
as bf16 (exact: every fp8 value is a bf16 value), since Triton dots need equal input types.

Scales (fp32) may be coarser than the chunks: a's scale is [M / t, K / B] and b's
[N / t, K / B] with t = 1 (per row), a block (128 for DeepSeek-V3's weights) or the whole
axis (per tensor), for any scale block B along the contraction that is a multiple of CHUNK.
They are expanded to one scale per chunk (and transposed, so a program's scales of one chunk
are contiguous) before the kernel runs.
Where b's scale is constant over a program's block_n columns the kernel loads one scalar
per chunk instead of a vector (one multiply-add per accumulator element instead of two).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from frontier_jax.precision.quantize import expand_scale

CHUNK = 128  # contraction chunk: every chunk's partial product is promoted to fp32
ROW_TILE = 128  # grouped layouts: rows come in tiles of 128 belonging to one group each


@dataclasses.dataclass(frozen=True)
class Fp8Tiling:
    """Output tile [block_m, block_n] per program; Triton warps and software-pipeline stages.
    Grouped row kernels need block_m to divide ROW_TILE."""
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4


DEFAULT_TILING = Fp8Tiling()


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"fp8 GEMM kernel: {message}")


def _chunks(k: int, scale_blocks: int, what: str) -> int:
    """Number of CHUNK-wide chunks of a contraction of width k with `scale_blocks` scales."""
    _check(k % CHUNK == 0, f"{what}: contraction width {k} is not a multiple of {CHUNK} "
                           "(pad it: quantize.pad_to_multiple)")
    _check((k // CHUNK) % scale_blocks == 0,
           f"{what}: {scale_blocks} scale blocks along a contraction of {k} are not a whole "
           f"number of {CHUNK}-wide chunks each")
    return k // CHUNK


def _row_scales(scale: jax.Array, rows: int, chunks: int, what: str) -> jax.Array:
    """scale [..., rows / t, K / B] -> [..., chunks, rows] fp32: one scale per row and chunk."""
    _check(rows % scale.shape[-2] == 0, f"{what}: scale {scale.shape} does not tile {rows} rows")
    lead = scale.shape[:-2]
    return jnp.swapaxes(expand_scale(scale.astype(jnp.float32), (*lead, rows, chunks)), -1, -2)


def _col_scales(scale: jax.Array, cols: int, chunks: int, block_n: int,
                what: str) -> tuple[jax.Array, bool]:
    """b's scale [..., cols / t, K / B] -> ([..., chunks, cols / block_n], True): one scale per
    program's columns, when t is a multiple of block_n; else ([..., chunks, cols], False)."""
    _check(cols % scale.shape[-2] == 0, f"{what}: scale {scale.shape} does not tile {cols} rows")
    per_program = (cols // scale.shape[-2]) % block_n == 0
    return _row_scales(scale, cols // block_n if per_program else cols, chunks, what), per_program


def _nt_dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [P, C] . b [Q, C] -> fp32 [P, Q] (contraction on the last dim of both)."""
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _scaled_chunks(load_a, load_b, load_sa, load_sb, start, stop, shape) -> jax.Array:
    """sum over chunks c in [start, stop) of dot(a_c, b_c^T) * sa_c[:, None] * sb_c[None, :]
    in fp32 -> `shape`; load_* (chunk slice or index -> block) read the refs, and load_sb may
    give a scalar (one scale for all columns)."""

    def step(c, acc):
        ks = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        row, col = load_sa(c), load_sb(c)
        scale = (row * col)[:, None] if col.ndim == 0 else row[:, None] * col[None, :]
        return acc + _nt_dot(load_a(ks), load_b(ks)) * scale

    return jax.lax.fori_loop(start, stop, step, jnp.zeros(shape, jnp.float32))


def _col_loader(sb_ref, j, block_n: int, per_program: bool, *lead):
    """Chunk c -> b's scales of column block j: a scalar (per_program) or a [block_n] vector."""
    if per_program:
        return lambda c: sb_ref[(*lead, c, j)]
    return lambda c: sb_ref[(*lead, c, pl.ds(j * block_n, block_n))]


def _dense_kernel(a_ref, b_ref, sa_ref, sb_ref, out_ref, *, per_program):
    """out tile [bm, bn] = sum_c sa sb dot(a[:, c], b[:, c]^T); a_ref [bm, K], b_ref [bn, K],
    sa_ref [K / CHUNK, M], sb_ref [K / CHUNK, N or N / bn]."""
    bm, bn = out_ref.shape
    i, j = pl.program_id(0), pl.program_id(1)
    acc = _scaled_chunks(lambda ks: a_ref[:, ks], lambda ks: b_ref[:, ks],
                         lambda c: sa_ref[c, pl.ds(i * bm, bm)],
                         _col_loader(sb_ref, j, bn, per_program), 0, sa_ref.shape[0], (bm, bn))
    out_ref[...] = acc.astype(out_ref.dtype)


def _rows_kernel(tile_group_ref, a_ref, w_ref, sa_ref, sw_ref, out_ref, *, num_groups,
                 per_program):
    """out tile [bm, bn] = a tile [bm, K] . W[g]^T (W[g] [N, K]) with g the tile's group;
    zeros where g >= num_groups.  sw_ref [G, K / CHUNK, N or N / bn]."""
    bm, bn = out_ref.shape
    i, j = pl.program_id(0), pl.program_id(1)
    group = tile_group_ref[i * bm // ROW_TILE]

    @pl.when(group < num_groups)
    def _():
        cols = pl.ds(j * bn, bn)
        acc = _scaled_chunks(lambda ks: a_ref[:, ks], lambda ks: w_ref[group, cols, ks],
                             lambda c: sa_ref[c, pl.ds(i * bm, bm)],
                             _col_loader(sw_ref, j, bn, per_program, group),
                             0, sa_ref.shape[0], (bm, bn))
        out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(group >= num_groups)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _weight_grad_kernel(tile_start_ref, a_ref, b_ref, sa_ref, sb_ref, out_ref, *, per_program):
    """out [bm, bn] of group g = sum over g's row tiles t of sa sb dot(a[:, t], b[:, t]^T);
    a_ref [bm, P] (rows of x^T), b_ref [bn, P] (rows of dy^T), sa_ref [P / 128, K],
    sb_ref [P / 128, N or N / bn]; an empty group gives zeros."""
    bm, bn = out_ref.shape
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    acc = _scaled_chunks(lambda ts: a_ref[:, ts], lambda ts: b_ref[:, ts],
                         lambda t: sa_ref[t, pl.ds(i * bm, bm)],
                         _col_loader(sb_ref, j, bn, per_program),
                         tile_start_ref[g], tile_start_ref[g + 1], (bm, bn))
    out_ref[...] = acc.astype(out_ref.dtype)


def _params(tiling: Fp8Tiling):
    return plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _full(shape):
    """BlockSpec of a whole (small or indexed-by-hand) array, for any grid rank."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _check_tiles(what: str, dims: dict, tiling: Fp8Tiling) -> None:
    for name, (size, tile) in dims.items():
        _check(size % tile == 0, f"{what}: {name} = {size} is not a multiple of its tile {tile} "
                                 f"({tiling}); pad it (quantize.pad_to_multiple)")


def fp8_matmul_nt(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *,
                  out_dtype=jnp.float32, tiling: Fp8Tiling = DEFAULT_TILING) -> jax.Array:
    """out [M, N] = sum_c sa[m, c] sb[n, c] (a_c b_c^T) for a [M, K], b [N, K] fp8 with scales
    a_scale [M or 1, K / B], b_scale [N / t, K / B] (see the module docstring)."""
    (m, k), (n, kb) = a.shape, b.shape
    what = f"a {a.shape} {a.dtype}, b {b.shape} {b.dtype}"
    _check(k == kb, f"{what}: contraction widths differ")
    _check_tiles(what, {"M": (m, tiling.block_m), "N": (n, tiling.block_n)}, tiling)
    chunks = _chunks(k, a_scale.shape[-1], what)
    _chunks(k, b_scale.shape[-1], what)
    sa = _row_scales(a_scale, m, chunks, what)
    sb, per_program = _col_scales(b_scale, n, chunks, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    return pl.pallas_call(
        functools.partial(_dense_kernel, per_program=per_program),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // bm, n // bn),
        in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((bn, k), lambda i, j: (j, 0)), _full(sa.shape), _full(sb.shape)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=_params(tiling), interpret=_interpret(), name="fp8_gemm_nt",
    )(a, b, sa, sb)


def fp8_grouped_rows_nt(a: jax.Array, a_scale: jax.Array, w: jax.Array, w_scale: jax.Array,
                        tile_group: jax.Array, *, out_dtype=jnp.float32,
                        tiling: Fp8Tiling = DEFAULT_TILING) -> jax.Array:
    """out[r] = sum_c sa[r, c] sw[g, n, c] (a[r]_c W[g]_c^T) with g = tile_group[r // 128]:
    a [M, K] rows (tile-aligned layout), a_scale [M or 1, K / B], w [G, N, K],
    w_scale [G, N / t, K / B], tile_group [M / 128] (G or more: zero rows) -> [M, N]."""
    (m, k), (g, n, kw) = a.shape, w.shape
    what = f"rows {a.shape} {a.dtype}, W {w.shape} {w.dtype}"
    _check(k == kw, f"{what}: contraction widths differ")
    _check(ROW_TILE % tiling.block_m == 0, f"block_m {tiling.block_m} must divide {ROW_TILE}")
    _check(tile_group.shape == (m // ROW_TILE,), f"{what}: tile_group {tile_group.shape} is not "
                                                 f"one group per {ROW_TILE} rows")
    _check_tiles(what, {"M": (m, ROW_TILE), "N": (n, tiling.block_n)}, tiling)
    chunks = _chunks(k, a_scale.shape[-1], what)
    _chunks(k, w_scale.shape[-1], what)
    sa = _row_scales(a_scale, m, chunks, what)
    sw, per_program = _col_scales(w_scale, n, chunks, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    return pl.pallas_call(
        functools.partial(_rows_kernel, num_groups=g, per_program=per_program),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(m // bm, n // bn),
        in_specs=[_full(tile_group.shape), pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                  _full(w.shape), _full(sa.shape), _full(sw.shape)],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=_params(tiling), interpret=_interpret(), name="fp8_grouped_rows_nt",
    )(tile_group.astype(jnp.int32), a, w, sa, sw)


def fp8_grouped_weight_grad_nt(a: jax.Array, a_scale: jax.Array, b: jax.Array,
                               b_scale: jax.Array, tile_start: jax.Array, *,
                               out_dtype=jnp.float32,
                               tiling: Fp8Tiling = DEFAULT_TILING) -> jax.Array:
    """out[g] = sum_{t in [tile_start[g], tile_start[g+1])} sa[:, t] sb[:, t] (a_t b_t^T) for
    a = x^T [K, P], b = dy^T [N, P] (P rows in 128-row tiles, quantized per 128 x 1 tile of the
    rows: a_scale [K or 1, P / 128 or 1], b_scale [N or 1, P / 128 or 1]) -> [G, K, N] with
    G = len(tile_start) - 1; each group's tiles are consecutive."""
    (k, p), (n, pb) = a.shape, b.shape
    g = tile_start.shape[0] - 1
    what = f"x^T {a.shape} {a.dtype}, dy^T {b.shape} {b.dtype}"
    _check(p == pb, f"{what}: row counts differ")
    _check_tiles(what, {"K": (k, tiling.block_m), "N": (n, tiling.block_n)}, tiling)
    tiles = _chunks(p, a_scale.shape[-1], what)
    _chunks(p, b_scale.shape[-1], what)
    sa = _row_scales(a_scale, k, tiles, what)
    sb, per_program = _col_scales(b_scale, n, tiles, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    return pl.pallas_call(
        functools.partial(_weight_grad_kernel, per_program=per_program),
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        grid=(g, k // bm, n // bn),
        in_specs=[_full(tile_start.shape), pl.BlockSpec((bm, p), lambda e, i, j: (i, 0)),
                  pl.BlockSpec((bn, p), lambda e, i, j: (j, 0)), _full(sa.shape),
                  _full(sb.shape)],
        out_specs=pl.BlockSpec((None, bm, bn), lambda e, i, j: (e, i, j)),
        compiler_params=_params(tiling), interpret=_interpret(),
        name="fp8_grouped_weight_grad_nt",
    )(tile_start.astype(jnp.int32), a, b, sa, sb)
