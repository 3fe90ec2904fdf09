"""Blockwise-scaled fp8 GEMMs in Pallas (Triton lowering on GPUs, the Pallas interpreter
elsewhere), all in "NT" form: both operands contract on their LAST dim, which Hopper's fp8
tensor-core instruction needs (both operands K-major).

With the contraction split into CHUNK = 128-wide chunks c (the DeepSeek-V3 scale block),

    dense         out[m, n]    = sum_c sa[m, c] sb[n, c] (sum_{k in c} a[m, k] b[n, k])
    grouped rows  out[r, n]    = same, with b = W[g(r)] (forward and input gradient)
    weight grad   out[g, k, n] = sum_{t in g} sa[k, t] sb[n, t] (sum_{r in t} a[k, r] b[n, r])
                  (a = x^T, b = dy^T; t: g's 128-row tiles, the chunks of this contraction)

Every loop iteration handles exactly one chunk: one fp8 x fp8 tensor-core dot of K = CHUNK
(fp32 result), scaled by its two scales and added into an fp32 accumulator (what
`precision.gemm`'s XLA reference computes; DeepSeek-V3's "promotion" every 128 products).
Scales (fp32) may be coarser than the chunks: a's scale is [M / t, K / B] and b's
[N / t, K / B] with t = 1 (per row), a block (128 for DeepSeek-V3's weights) or the whole
axis (per tensor), for any scale block B along the contraction that is a multiple of CHUNK.
They are expanded to one scale per chunk and transposed to [K / CHUNK, rows], so a program's
scales of one chunk are one contiguous vector load.  Where b's scale is constant over a
program's block_n columns the kernel loads one scalar per chunk instead of a vector (one
multiply-add per accumulator element instead of two).

Where both scales are constant along the contraction (per tensor, per row / column: one
scale block along K) nothing is rescaled inside the loop: the tensor cores accumulate into
the loop-carried accumulator and the scales are applied once, in the epilogue.

Hopper specifics (why the dot is not a plain `lax.dot_general`):
  * Pallas lowers `dot_general` to `tt.dot` with Triton's default maxNumImpreciseAcc = 0,
    which for fp8 operands makes Triton split EVERY 32-deep wgmma into its own partial fp32
    accumulator and add it into the result with FADDs (a third accumulator-sized register
    set and an add pass per wgmma: register spills at 128-row tiles and serialised tensor
    cores).  `_fp8_dot` below emits `tt.dot` itself with maxNumImpreciseAcc set, i.e. the
    fp8 x fp8 -> fp32 wgmma with the operands kept in fp8 (never upcast): per chunk the 128
    products accumulate in the tensor cores' own accumulator (as in DeepSeek-V3 and
    Triton's own default on sm_90), and chunks are promoted by the scaled fp32 add.  In the
    unscaled-loop path (scales constant along K) `Fp8Tiling.fast_accum` picks between one
    promotion per chunk (False, the default: Triton adds each chunk's partial result into
    the fp32 accumulator) and accumulating all of K in the tensor cores (True, like cuBLAS's
    fp8 "fast accumulation").
  * Two different fp8 formats (e5m2 gradients times e4m3 weights) feed the tensor cores
    directly (wgmma takes mixed e4m3 / e5m2 operands); the interpreter multiplies them as bf16
    (exact: every fp8 value is a bf16 value).
  * Programs run on a 1-D grid whose order is chosen for L2 reuse: dense GEMMs walk
    `group_m` row blocks per column block (a band of A stays in L2 while B streams), the
    grouped kernels walk the column blocks of one row block (or one group) consecutively.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.interpreters import mlir

from frontier_jax.kernels.fp8_scaling import expand_scale
from frontier_jax.kernels.grouped_gemm import TILE_ROWS  # the tile-aligned expert row layout
from frontier_jax.kernels.lowering import interpret

try:  # the Pallas Triton lowering's rule registry (private: checked at import, see _fp8_dot)
    from jax._src.lib.mlir import ir as _ir
    from jax._src.lib.mlir.dialects import arith as _arith
    from jax._src.lib.triton import dialect as _tt
    from jax._src.pallas.triton import lowering as _triton_lowering
except ImportError:  # pragma: no cover - other jax layouts: Pallas' own dot lowering
    _triton_lowering = None

CHUNK = 128  # contraction chunk: every chunk's partial product is promoted to fp32
FAST_ACCUM = 2**30  # maxNumImpreciseAcc: never split the tensor-core accumulation
FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
NATIVE_MIXED_FP8 = True  # e5m2 x e4m3 straight into the wgmma (False: both as bf16, slower)


@dataclasses.dataclass(frozen=True)
class Fp8Tiling:
    """Output tile [block_m, block_n] per program; Triton warps (4 per warpgroup: a warpgroup
    owns 64 accumulator rows) and software-pipeline stages (one CHUNK-deep slice of both
    operands per stage).  Grouped row kernels need block_m to divide TILE_ROWS.

    group_m: dense GEMMs visit output tiles in bands of group_m row blocks, column block by
        column block (L2 reuse of A's band); 1 = row by row.
    lag: the blocked loop applies chunk c-1's scales while chunk c's dot runs (one more
        accumulator-sized register set, lets the scaling overlap the asynchronous wgmma).
    fast_accum: scales constant along K only: accumulate all of K in the tensor cores
        instead of promoting every chunk to fp32.
    native_dot: emit tt.dot with maxNumImpreciseAcc (see the module docstring); False uses
        Pallas' dot_general lowering (Triton's split fp8 accumulation; for comparison)."""

    block_m: int = 64  # 64 x 128, 4 warps, 4 stages: fastest of the H100 sweep (RESULTS.md)
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8
    lag: bool = False
    fast_accum: bool = False
    native_dot: bool = True

    @property
    def name(self) -> str:
        flags = "".join(
            f for f, on in (("l", self.lag), ("f", self.fast_accum), ("p", not self.native_dot)) if on
        )
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}g{self.group_m}{flags}"

    @classmethod
    def parse(cls, text: str) -> "Fp8Tiling":
        """'128x128w8s4g8' (+ flags l: lag, f: fast_accum, p: Pallas dot) -> Fp8Tiling."""
        match = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)(?:g(\d+))?([lfp]*)", text.strip())
        if not match:
            raise ValueError(f"tiling {text!r} is not like 128x128w8s4g8 (+ flags l, f, p)")
        bm, bn, w, s, g, flags = match.groups()
        return cls(
            int(bm), int(bn), int(w), int(s), int(g or 8), "l" in flags, "f" in flags, "p" not in flags
        )


DEFAULT_TILING = Fp8Tiling()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"fp8 GEMM kernel: {message}")


def _chunks(k: int, scale_blocks: int, what: str) -> int:
    """Number of CHUNK-wide chunks of a contraction of width k with `scale_blocks` scales."""
    _check(
        k % CHUNK == 0,
        f"{what}: contraction width {k} is not a multiple of {CHUNK} (pad it: quantize.pad_to_multiple)",
    )
    _check(
        (k // CHUNK) % scale_blocks == 0,
        f"{what}: {scale_blocks} scale blocks along a contraction of {k} are not a whole "
        f"number of {CHUNK}-wide chunks each",
    )
    return k // CHUNK


def chunk_row_scales(scale: jax.Array, rows: int, chunks: int, what: str) -> jax.Array:
    """scale [..., rows / t, K / B] -> [..., chunks, rows] fp32: one scale per row and chunk."""
    _check(rows % scale.shape[-2] == 0, f"{what}: scale {scale.shape} does not tile {rows} rows")
    lead = scale.shape[:-2]
    return jnp.swapaxes(expand_scale(scale.astype(jnp.float32), (*lead, rows, chunks)), -1, -2)


def _col_scales(scale: jax.Array, cols: int, chunks: int, block_n: int, what: str) -> tuple[jax.Array, bool]:
    """b's scale [..., cols / t, K / B] -> ([..., chunks, cols / block_n], True): one scale per
    program's columns, when t is a multiple of block_n; else ([..., chunks, cols], False)."""
    _check(cols % scale.shape[-2] == 0, f"{what}: scale {scale.shape} does not tile {cols} rows")
    per_program = (cols // scale.shape[-2]) % block_n == 0
    return chunk_row_scales(scale, cols // block_n if per_program else cols, chunks, what), per_program


def _scale_chunks(a_scale: jax.Array, b_scale: jax.Array, k: int, what: str) -> tuple[int, bool]:
    """(chunks of the contraction, whether the scales vary along it: the blocked loop)."""
    chunks = _chunks(k, a_scale.shape[-1], what)
    _chunks(k, b_scale.shape[-1], what)
    return chunks, a_scale.shape[-1] > 1 or b_scale.shape[-1] > 1


# ---------------------------------------------------------------------------------------------
# The fp8 tensor-core dot: a [P, C] . b [Q, C]^T (+ acc) -> fp32 [P, Q]


def _reference_dot(a, b, *acc, max_imprecise):
    """The dot's value (interpreter, XLA): exact products, fp32 sums."""
    del max_imprecise
    if a.dtype != b.dtype:
        a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    out = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return out + acc[0] if acc else out


def _fp8_dot_triton(ctx, a, b, *acc, max_imprecise):
    """tt.dot(a, trans(b), acc or 0) with maxNumImpreciseAcc = max_imprecise: fp8 operands
    go to the wgmma as they are (equal bit widths: mixed e4m3 / e5m2 included)."""
    del ctx
    (p, _), (q, _) = _ir.RankedTensorType(a.type).shape, _ir.RankedTensorType(b.type).shape
    if acc:
        c = acc[0]
    else:
        f32 = _ir.F32Type.get()
        zeros = _ir.RankedTensorType.get([p, q], f32)
        c = _arith.constant(zeros, _ir.DenseElementsAttr.get_splat(zeros, _ir.FloatAttr.get(f32, 0.0)))
    return _tt.dot(a, _tt.trans(b, (1, 0)), c, max_num_imprecise_acc=max_imprecise)


def _register_fp8_dot():
    """The `fp8_nt_dot` primitive: the reference value everywhere but in the Pallas Triton
    lowering, where it is `_fp8_dot_triton`; None (Pallas' dot_general instead) where this
    jax lacks the pieces."""
    if _triton_lowering is None:
        return None
    try:
        import jax.extend.core

        shaped_array = getattr(jax.core, "ShapedArray", None)
        if shaped_array is None:
            from jax._src.core import ShapedArray as shaped_array
        primitive = jax.extend.core.Primitive("fp8_nt_dot")
        primitive.def_impl(_reference_dot)
        primitive.def_abstract_eval(
            lambda a, b, *acc, max_imprecise: shaped_array((a.shape[0], b.shape[0]), jnp.dtype(jnp.float32))
        )
        mlir.register_lowering(primitive, mlir.lower_fun(_reference_dot, multiple_results=False))
        _triton_lowering.register_lowering(primitive)(_fp8_dot_triton)
    except Exception as e:  # pragma: no cover - jax internals moved
        import warnings

        warnings.warn(
            f"fp8_gemm: native fp8 tt.dot unavailable ({e!r}); Pallas' dot_general "
            "lowering is used (Triton's split fp8 accumulation: slow)"
        )
        return None
    return primitive


_fp8_dot_p = _register_fp8_dot()


def _fp8_dot(
    a: jax.Array, b: jax.Array, acc: jax.Array | None, tiling: "Fp8Tiling", max_imprecise: int = FAST_ACCUM
) -> jax.Array:
    """a [P, C] . b [Q, C]^T (+ acc) in fp32, C = CHUNK (one chunk)."""
    fp8 = a.dtype in FP8_DTYPES and b.dtype in FP8_DTYPES and (a.dtype == b.dtype or NATIVE_MIXED_FP8)
    if tiling.native_dot and fp8 and _fp8_dot_p is not None:
        return _fp8_dot_p.bind(a, b, *([] if acc is None else [acc]), max_imprecise=max_imprecise)
    out = _reference_dot(a, b, max_imprecise=0)
    return out if acc is None else acc + out


# ---------------------------------------------------------------------------------------------
# Kernel bodies


def _tile_ids(pid, ni: int, nj: int, group_m: int):
    """1-D program id -> output tile (i, j) of an [ni, nj] grid of tiles: bands of group_m
    row blocks, column block by column block inside a band (group_m = 1: j fastest)."""
    div, rem = jax.lax.div, jax.lax.rem
    if group_m <= 1 or ni <= 1:
        return div(pid, nj), rem(pid, nj)
    group_m = min(group_m, ni)
    band = group_m * nj
    first = div(pid, band) * group_m
    rows = jnp.minimum(ni - first, group_m) if ni % group_m else group_m
    local = rem(pid, band)
    return first + rem(local, rows), div(local, rows)


def _gemm_tile(
    load_a, load_b, load_sa, load_sb, start, stop, shape, tiling: Fp8Tiling, blocked: bool
) -> jax.Array:
    """fp32 [bm, bn] = sum over chunks c in [start, stop) of dot(a_c, b_c^T) sa_c sb_c;
    load_a / load_b (chunk slice -> [bm or bn, CHUNK]), load_sa (c -> [bm]), load_sb (c -> a
    scalar: one scale for all columns, or [bn]).  Unblocked (scales constant along K, chunk
    index 0): the tensor cores accumulate over the loop and the scales apply once."""

    def operands(c):
        ks = pl.ds(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        return load_a(ks), load_b(ks)

    def scale(row, col):
        return (row * col)[:, None] if col.ndim == 0 else row[:, None] * col[None, :]

    zeros = jnp.zeros(shape, jnp.float32)
    if not blocked:
        imprecise = FAST_ACCUM if tiling.fast_accum else CHUNK
        acc = jax.lax.fori_loop(
            start, stop, lambda c, acc: _fp8_dot(*operands(c), acc, tiling, imprecise), zeros
        )
        return acc * scale(load_sa(0), load_sb(0))

    if not tiling.lag:

        def step(c, acc):
            return acc + _fp8_dot(*operands(c), None, tiling) * scale(load_sa(c), load_sb(c))

        return jax.lax.fori_loop(start, stop, step, zeros)

    # lag: chunk c's dot is issued before chunk c-1's product is scaled into the accumulator
    def lagged(c, carry):
        acc, prev, row, col = carry
        d = _fp8_dot(*operands(c), None, tiling)
        return acc + prev * scale(row, col), d, load_sa(c), load_sb(c)

    col0 = jnp.zeros_like(load_sb(0))  # (shape only: chunk `start` may be past the end)
    carry = (zeros, zeros, jnp.zeros(shape[:1], jnp.float32), col0)
    acc, prev, row, col = jax.lax.fori_loop(start, stop, lagged, carry)
    return acc + prev * scale(row, col)


def _col_loader(sb_ref, j, block_n: int, per_program: bool, *lead):
    """Chunk c -> b's scales of column block j: a scalar (per_program) or a [block_n] vector."""
    if per_program:
        return lambda c: sb_ref[(*lead, c, j)]
    return lambda c: sb_ref[(*lead, c, pl.ds(pl.multiple_of(j * block_n, block_n), block_n))]


def _row_loader(sa_ref, i, block_m: int):
    return lambda c: sa_ref[c, pl.ds(pl.multiple_of(i * block_m, block_m), block_m)]


def _dense_kernel(a_ref, b_ref, sa_ref, sb_ref, out_ref, *, tiles, per_program, blocked, tiling):
    """out tile [bm, bn] = sum_c sa sb dot(a[:, c], b[:, c]^T); a_ref [bm, K], b_ref [bn, K],
    sa_ref [K / CHUNK, M], sb_ref [K / CHUNK, N or N / bn] (one row when unblocked)."""
    bm, bn = out_ref.shape
    i, j = _tile_ids(pl.program_id(0), *tiles, tiling.group_m)
    acc = _gemm_tile(
        lambda ks: a_ref[:, ks],
        lambda ks: b_ref[:, ks],
        _row_loader(sa_ref, i, bm),
        _col_loader(sb_ref, j, bn, per_program),
        0,
        a_ref.shape[1] // CHUNK,
        (bm, bn),
        tiling,
        blocked,
    )
    out_ref[...] = acc.astype(out_ref.dtype)


def _rows_kernel(
    tile_group_ref, a_ref, w_ref, sa_ref, sw_ref, out_ref, *, tiles, num_groups, per_program, blocked, tiling
):
    """out tile [bm, bn] = a tile [bm, K] . W[g]^T (W[g] [N, K]) with g the tile's group;
    zeros where g >= num_groups.  sw_ref [G, K / CHUNK, N or N / bn]."""
    bm, bn = out_ref.shape
    i, j = _tile_ids(pl.program_id(0), *tiles, 1)
    group = tile_group_ref[i * bm // TILE_ROWS]

    @pl.when(group < num_groups)
    def _():
        cols = pl.ds(pl.multiple_of(j * bn, bn), bn)
        acc = _gemm_tile(
            lambda ks: a_ref[:, ks],
            lambda ks: w_ref[group, cols, ks],
            _row_loader(sa_ref, i, bm),
            _col_loader(sw_ref, j, bn, per_program, group),
            0,
            a_ref.shape[1] // CHUNK,
            (bm, bn),
            tiling,
            blocked,
        )
        out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(group >= num_groups)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _weight_grad_kernel(
    tile_start_ref, a_ref, b_ref, sa_ref, sb_ref, out_ref, *, tiles, per_program, blocked, tiling
):
    """out [bm, bn] of group g = sum over g's row tiles t of sa sb dot(a[:, t], b[:, t]^T);
    a_ref [bm, P] (rows of x^T), b_ref [bn, P] (rows of dy^T), sa_ref [P / 128, K],
    sb_ref [P / 128, N or N / bn] (one row when unblocked); an empty group gives zeros."""
    bm, bn = out_ref.shape
    g, ij = _tile_ids(pl.program_id(0), 1, tiles[0] * tiles[1], 1)  # (group, tile in group)
    i, j = _tile_ids(ij, *tiles, 1)
    acc = _gemm_tile(
        lambda ts: a_ref[:, ts],
        lambda ts: b_ref[:, ts],
        _row_loader(sa_ref, i, bm),
        _col_loader(sb_ref, j, bn, per_program),
        tile_start_ref[g],
        tile_start_ref[g + 1],
        (bm, bn),
        tiling,
        blocked,
    )
    out_ref[...] = acc.astype(out_ref.dtype)


def _params(tiling: Fp8Tiling):
    return plgpu.CompilerParams(num_warps=tiling.num_warps, num_stages=tiling.num_stages)


def _full(shape):
    """BlockSpec of a whole (small or indexed-by-hand) array, for any grid rank."""
    return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def _check_tiles(what: str, dims: dict, tiling: Fp8Tiling) -> None:
    for name, (size, tile) in dims.items():
        _check(
            size % tile == 0,
            f"{what}: {name} = {size} is not a multiple of its tile {tile} "
            f"({tiling}); pad it (quantize.pad_to_multiple)",
        )


def _prepared_scales(a_scale, b_scale, k: int, rows: int, cols: int, block_n: int, what: str):
    """(sa [chunks, rows], sb, per_program, blocked): both operands' scales expanded to one per
    contraction chunk (a single chunk when neither is blocked along the contraction)."""
    chunks, blocked = _scale_chunks(a_scale, b_scale, k, what)
    chunks = chunks if blocked else 1
    sa = chunk_row_scales(a_scale, rows, chunks, what)
    sb, per_program = _col_scales(b_scale, cols, chunks, block_n, what)
    return sa, sb, per_program, blocked


def fp8_matmul_nt(
    a: jax.Array,
    a_scale: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    *,
    out_dtype=jnp.float32,
    tiling: Fp8Tiling = DEFAULT_TILING,
) -> jax.Array:
    """out [M, N] = sum_c sa[m, c] sb[n, c] (a_c b_c^T) for a [M, K], b [N, K] fp8 with scales
    a_scale [M or 1, K / B], b_scale [N / t, K / B] (see the module docstring)."""
    (m, k), (n, kb) = a.shape, b.shape
    what = f"a {a.shape} {a.dtype}, b {b.shape} {b.dtype}"
    _check(k == kb, f"{what}: contraction widths differ")
    _check_tiles(what, {"M": (m, tiling.block_m), "N": (n, tiling.block_n)}, tiling)
    sa, sb, per_program, blocked = _prepared_scales(a_scale, b_scale, k, m, n, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    tiles = (m // bm, n // bn)
    tile = lambda p: _tile_ids(p, *tiles, tiling.group_m)
    return pl.pallas_call(
        functools.partial(
            _dense_kernel, tiles=tiles, per_program=per_program, blocked=blocked, tiling=tiling
        ),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(tiles[0] * tiles[1],),
        in_specs=[
            pl.BlockSpec((bm, k), lambda p: (tile(p)[0], 0)),
            pl.BlockSpec((bn, k), lambda p: (tile(p)[1], 0)),
            _full(sa.shape),
            _full(sb.shape),
        ],
        out_specs=pl.BlockSpec((bm, bn), tile),
        compiler_params=_params(tiling),
        interpret=interpret(),
        name="fp8_gemm_nt",
    )(a, b, sa, sb)


def fp8_grouped_rows_nt(
    a: jax.Array,
    a_scale: jax.Array,
    w: jax.Array,
    w_scale: jax.Array,
    tile_group: jax.Array,
    *,
    out_dtype=jnp.float32,
    tiling: Fp8Tiling = DEFAULT_TILING,
) -> jax.Array:
    """out[r] = sum_c sa[r, c] sw[g, n, c] (a[r]_c W[g]_c^T) with g = tile_group[r // 128]:
    a [M, K] rows (tile-aligned layout), a_scale [M or 1, K / B], w [G, N, K],
    w_scale [G, N / t, K / B], tile_group [M / 128] (G or more: zero rows) -> [M, N]."""
    (m, k), (g, n, kw) = a.shape, w.shape
    what = f"rows {a.shape} {a.dtype}, W {w.shape} {w.dtype}"
    _check(k == kw, f"{what}: contraction widths differ")
    _check(TILE_ROWS % tiling.block_m == 0, f"block_m {tiling.block_m} must divide {TILE_ROWS}")
    _check(
        tile_group.shape == (m // TILE_ROWS,),
        f"{what}: tile_group {tile_group.shape} is not one group per {TILE_ROWS} rows",
    )
    _check_tiles(what, {"M": (m, TILE_ROWS), "N": (n, tiling.block_n)}, tiling)
    sa, sw, per_program, blocked = _prepared_scales(a_scale, w_scale, k, m, n, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    tiles = (m // bm, n // bn)
    tile = lambda p: _tile_ids(p, *tiles, 1)
    return pl.pallas_call(
        functools.partial(
            _rows_kernel, tiles=tiles, num_groups=g, per_program=per_program, blocked=blocked, tiling=tiling
        ),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(tiles[0] * tiles[1],),
        in_specs=[
            _full(tile_group.shape),
            pl.BlockSpec((bm, k), lambda p: (tile(p)[0], 0)),
            _full(w.shape),
            _full(sa.shape),
            _full(sw.shape),
        ],
        out_specs=pl.BlockSpec((bm, bn), tile),
        compiler_params=_params(tiling),
        interpret=interpret(),
        name="fp8_grouped_rows_nt",
    )(tile_group.astype(jnp.int32), a, w, sa, sw)


def fp8_grouped_weight_grad_nt(
    a: jax.Array,
    a_scale: jax.Array,
    b: jax.Array,
    b_scale: jax.Array,
    tile_start: jax.Array,
    *,
    out_dtype=jnp.float32,
    tiling: Fp8Tiling = DEFAULT_TILING,
) -> jax.Array:
    """out[g] = sum_{t in [tile_start[g], tile_start[g+1])} sa[:, t] sb[:, t] (a_t b_t^T) for
    a = x^T [K, P], b = dy^T [N, P] (P rows in 128-row tiles, quantized per 128 x 1 tile of the
    rows: a_scale [K or 1, P / 128 or 1], b_scale [N or 1, P / 128 or 1]) -> [G, K, N] with
    G = len(tile_start) - 1; each group's tiles are consecutive."""
    (k, p), (n, pb) = a.shape, b.shape
    g = tile_start.shape[0] - 1
    what = f"x^T {a.shape} {a.dtype}, dy^T {b.shape} {b.dtype}"
    _check(p == pb, f"{what}: row counts differ")
    _check_tiles(what, {"K": (k, tiling.block_m), "N": (n, tiling.block_n)}, tiling)
    sa, sb, per_program, blocked = _prepared_scales(a_scale, b_scale, p, k, n, tiling.block_n, what)
    bm, bn = tiling.block_m, tiling.block_n
    tiles = (k // bm, n // bn)
    per_group = tiles[0] * tiles[1]

    def tile(q):  # program -> (group, i, j): one group's tiles are consecutive programs
        e, ij = _tile_ids(q, g, per_group, 1)
        return (e, *_tile_ids(ij, *tiles, 1))

    return pl.pallas_call(
        functools.partial(
            _weight_grad_kernel, tiles=tiles, per_program=per_program, blocked=blocked, tiling=tiling
        ),
        out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
        grid=(g * per_group,),
        in_specs=[
            _full(tile_start.shape),
            pl.BlockSpec((bm, p), lambda q: (tile(q)[1], 0)),
            pl.BlockSpec((bn, p), lambda q: (tile(q)[2], 0)),
            _full(sa.shape),
            _full(sb.shape),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), tile),
        compiler_params=_params(tiling),
        interpret=interpret(),
        name="fp8_grouped_weight_grad_nt",
    )(tile_start.astype(jnp.int32), a, b, sa, sb)
