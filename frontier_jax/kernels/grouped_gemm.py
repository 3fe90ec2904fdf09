"""Grouped GEMM for routed experts, written in Pallas (Triton lowering on GPUs, the Pallas
interpreter elsewhere), with its backward as two more kernels.

Layout ("tile-aligned groups"): rows of x [M, K] are sorted by group and every group starts
at a multiple of TILE_ROWS (the MoE dispatch pads each group with zero rows), so each row
tile t = rows [t R, (t+1) R) belongs to one group g(t) (G for tiles past the last group).

    forward       y[r]  = x[r] W[g(r)]                 x [M, K], W [G, K, N] -> y [M, N]
    input grad    dx[r] = dy[r] W[g(r)]^T              (the forward kernel, W contracted on N)
    weight grad   dW[g] = sum_{t: g(t) = g} x_t^T dy_t  -> [G, K, N]

The two row kernels run a (tiles, N / block) grid: each program loads its tile's group id
and multiplies the [R, K] row tile by that group's [K, block] weight slice, K in steps of
`block_contract`, accumulating in fp32.  The weight-gradient kernel runs a
(G, K / block_k, N / block_n) grid: each program sums x_t^T dy_t over its group's tiles (a
loop with a data-dependent trip count; empty groups give zeros).  Operands are bf16 (or any
float dtype), accumulation fp32, outputs in the operands' dtype.

Gathered rows (`lhs_rows`): the rows may instead be read straight from a source matrix,
x_sorted[r] = x[lhs_rows[r]] (a zero row where lhs_rows[r] is outside [0, S)), for x [S, K]:
the forward and weight-gradient kernels load their row tiles through the index vector (Triton
gather loads: one pointer per row), so the sorted [M, K] copy is never written.  Its transpose
needs the inverse map lhs_copies [S, C] (the rows r with lhs_rows[r] = s, padded with M):
dx[s] = sum_c dx_sorted[lhs_copies[s, c]] -- a gather-sum in XLA, not a scatter-add.

Combined rows (`out_rows`, `out_weights`): the product rows may instead be weighted and summed
into T output rows, out[t] = sum_p w[t, p] z[t P + p] with z[out_rows[r]] = y[r] (the MoE
combine of each token's P = K expert outputs): the forward kernel stores row r straight at row
out_rows[r] of z (a masked scatter store; the map is one-to-one, so no two programs write one
row) and XLA sums the P rows of each token; the input-gradient and weight-gradient kernels read
their dy rows as w.flat[a] d_out[a // P] (a = out_rows[r]: a gather load and a per-row scale),
so the [M, N] gradient of y in row order is never written either.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from frontier_jax.kernels.lowering import interpret

TILE_ROWS = 128


# Defaults: the fastest of the tilings timed by benchmarks/moe_layer.py on an H100 for the
# bench-1b expert shapes (benchmarks/RESULTS.md).  Shared memory per pipeline stage is
# 2 bytes x (rows x contraction + contraction x output) of each program's tiles; Hopper has
# 227 KiB per block, so stages x that must stay below it.
@dataclasses.dataclass(frozen=True)
class RowTiling:
    """Tiles of the forward / input-gradient kernel: output [TILE_ROWS, block_out] per
    program, contraction in steps of block_contract."""

    block_out: int = 256
    block_contract: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class WeightTiling:
    """Tiles of the weight-gradient kernel: output [block_k, block_n] per program, the rows
    contracted in steps of block_rows (a divisor of TILE_ROWS)."""

    block_k: int = 128
    block_n: int = 256
    block_rows: int = 64
    num_warps: int = 8
    num_stages: int = 3


@dataclasses.dataclass(frozen=True)
class Tilings:
    forward: RowTiling = RowTiling()
    input_grad: RowTiling = RowTiling()
    weight_grad: WeightTiling = WeightTiling()
    # gathered rows (lhs_rows): 64 x 256 output tiles, 4 warps, 4 stages ran the bench-1b
    # gate/up weight gradient in 1.18 ms against 1.51 with the default (H200, benchmarks/RESULTS.md)
    # (also the combined rows' weight gradient, dy gathered: not yet timed on a GPU)
    weight_grad_gathered: WeightTiling = WeightTiling(block_k=64, block_n=256, num_warps=4, num_stages=4)


DEFAULT_TILINGS = Tilings()


def _block(size: int, preferred: int, what: str) -> int:
    """The largest power of two <= preferred (and >= 16) dividing `size`."""
    block = preferred
    while block >= 16:
        if size % block == 0:
            return block
        block //= 2
    raise ValueError(
        f"grouped GEMM: {what} = {size} must be a multiple of 16 (Triton tiles); "
        "choose model sizes (hidden_size, moe_ffn_dim) that are"
    )


# Shared memory a program's pipelined tiles may take: Hopper allows 227 KiB per block; the
# margin leaves room for what Triton adds (barriers, the epilogue's staging).
SHARED_MEMORY_BUDGET = 200 * 1024


def _stages(preferred: int, itemsize: int, tile_elements: int) -> int:
    """Pipeline stages: `preferred`, fewer where stages x the tiles of one stage (tile_elements
    operand elements of itemsize bytes) would not fit SHARED_MEMORY_BUDGET (float32 operands
    take twice bf16's bytes with the same tiles); at least 1."""
    return max(1, min(preferred, SHARED_MEMORY_BUDGET // (itemsize * tile_elements)))


def padded_rows_bound(rows: int, num_groups: int, align: int) -> int:
    """Rows that hold any split of `rows` rows over G groups when every group is padded to a
    multiple of `align`: ceil((rows + G (align - 1)) / align) align (static)."""
    return -(-(rows + num_groups * (align - 1)) // align) * align


def padded_groups(group_sizes: jax.Array, align: int) -> tuple[jax.Array, jax.Array]:
    """group_sizes [G] -> (padded [G]: each rounded up to a multiple of `align`, start [G]:
    first row of each group when the groups follow one another padded)."""
    padded = -(-group_sizes // align) * align
    return padded, jnp.cumsum(padded) - padded


def tile_groups(group_sizes: jax.Array, num_tiles: int) -> tuple[jax.Array, jax.Array]:
    """group_sizes [G] (multiples of TILE_ROWS) -> (tile_group [num_tiles]: group of each row
    tile, G past the last group; tile_start [G + 1]: first tile of each group, then the end)."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32)) // TILE_ROWS
    tile_group = jnp.searchsorted(ends, jnp.arange(num_tiles, dtype=jnp.int32), side="right")
    return tile_group.astype(jnp.int32), jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])


def _row_kernel(
    tile_group_ref, *refs, num_groups, block_out, block_contract, contract_last, gathered, scaled, scattered
):
    """out tile [R, bo] = x tile [R, C] @ W[g] (C-blocks), W[g] stored [C, O] or, when
    contract_last, [O, C].  When gathered, the x tile is rows x[lhs_rows[tile]] of the whole
    source x (zero rows where the index is outside it); when scaled, output row r is multiplied
    by row_scale[r] (fp32, before rounding); when scattered, row r goes to row out_rows[r] of
    the whole output (nowhere where the index is outside it).  Grid (column block, row tile):
    the column block varies fastest, so the programs running together share row tiles (and
    groups) in L2 instead of each row tile being read from memory once per column block."""
    refs = list(refs)
    lhs_rows_ref = refs.pop(0) if gathered else None
    scale_ref = refs.pop(0) if scaled else None
    out_rows_ref = refs.pop(0) if scattered else None
    x_ref, w_ref, out_ref = refs
    group = tile_group_ref[pl.program_id(1)]
    contract = x_ref.shape[1]
    cols = pl.ds(pl.program_id(0) * block_out, block_out)
    if gathered:
        source, valid = _source_rows(lhs_rows_ref[...], x_ref.shape[0])
        load_rows = lambda c: _gather_rows(x_ref, source, valid, c)
    else:
        load_rows = lambda c: x_ref[:, c]

    def store(acc):
        if scaled:
            acc = acc * scale_ref[...][:, None]
        if scattered:
            _scatter_rows(out_ref, out_rows_ref[...], cols, acc)
        else:
            out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(group < num_groups)
    def _():
        def step(i, acc):
            c = pl.ds(pl.multiple_of(i * block_contract, block_contract), block_contract)
            a = load_rows(c)
            if contract_last:
                b = w_ref[group, cols, c]
                dims = (((1,), (1,)), ((), ()))
            else:
                b = w_ref[group, c, cols]
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

        store(
            jax.lax.fori_loop(
                0, contract // block_contract, step, jnp.zeros((TILE_ROWS, block_out), jnp.float32)
            )
        )

    @pl.when(group >= num_groups)
    def _():
        store(jnp.zeros((TILE_ROWS, block_out), jnp.float32))


def _source_rows(index: jax.Array, num_source_rows: int) -> tuple[jax.Array, jax.Array]:
    """Row indices into a source of num_source_rows rows -> (index clamped into it, valid:
    whether the index was inside [0, num_source_rows))."""
    valid = (index >= 0) & (index < num_source_rows)
    return jnp.where(valid, index, 0), valid


def _element_indices(rows: jax.Array, valid: jax.Array, cols) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows [R] and a column slice -> (row index, column index, mask) [R, cols], one entry per
    element: Triton gathers and scatters take a pointer per element.  Both dimensions are
    integer arrays (the interpreter's masked loads and stores take no mix of arrays and slices)."""
    shape = (rows.shape[0], cols.size)
    col = jnp.broadcast_to(cols.start + jnp.arange(cols.size, dtype=jnp.int32), shape)
    return jnp.broadcast_to(rows[:, None], shape), col, jnp.broadcast_to(valid[:, None], shape)


def _gather_rows(x_ref, source: jax.Array, valid: jax.Array, cols) -> jax.Array:
    """x[source, cols] [R, cols], zero in the rows that are not valid: one masked gather load
    (zero-filled where masked, so the load still pipelines)."""
    row, col, mask = _element_indices(source, valid, cols)
    return plgpu.load(x_ref.at[row, col], mask=mask, other=0)


def _scatter_rows(out_ref, index: jax.Array, cols, value: jax.Array) -> None:
    """out[index, cols] = value [R, cols] (rounded to out's dtype) in the rows whose index is
    inside out: one masked scatter store.  The other rows point past out's end rather than being
    clamped onto a row another row stores to (the interpreter runs a masked store as a scatter of
    the old values in the masked rows, which drops out-of-range rows but races duplicates)."""
    valid = (index >= 0) & (index < out_ref.shape[0])
    row, col, mask = _element_indices(jnp.where(valid, index, out_ref.shape[0]), valid, cols)
    plgpu.store(out_ref.at[row, col], value.astype(out_ref.dtype), mask=mask)


def _row_operand(index: jax.Array) -> tuple[pl.BlockSpec, jax.Array]:
    """A per-row vector [M] read by each program in its row tile's block."""
    return pl.BlockSpec((TILE_ROWS,), lambda j, t: (t,)), index


def _row_matmul(
    x: jax.Array,
    w: jax.Array,
    tile_group: jax.Array,
    *,
    contract_last: bool,
    tiling: RowTiling,
    lhs_rows: jax.Array | None = None,
    row_scale: jax.Array | None = None,
    out_rows: jax.Array | None = None,
    num_out_rows: int | None = None,
) -> jax.Array:
    """x [M, C] rows (or, given lhs_rows [M], rows x[lhs_rows] of x [S, C]), W [G, C, O] (or
    [G, O, C] when contract_last) -> [M, O], row r times row_scale[r] when given ([M] fp32);
    given out_rows [M], the [num_out_rows, O] matrix holding row r at row out_rows[r] instead
    (the caller covers every output row: the others are never written)."""
    gathered, scaled, scattered = lhs_rows is not None, row_scale is not None, out_rows is not None
    m = lhs_rows.shape[0] if gathered else x.shape[0]
    c = x.shape[1]
    g = w.shape[0]
    o = w.shape[1] if contract_last else w.shape[2]
    bo = _block(o, tiling.block_out, "output width")
    bc = _block(c, tiling.block_contract, "contraction width")
    kernel = functools.partial(
        _row_kernel,
        num_groups=g,
        block_out=bo,
        block_contract=bc,
        contract_last=contract_last,
        gathered=gathered,
        scaled=scaled,
        scattered=scattered,
    )
    per_row = [_row_operand(a) for a in (lhs_rows, row_scale, out_rows) if a is not None]
    if gathered:  # the whole source; the tile's row indices select from it
        rows_spec = pl.BlockSpec(x.shape, lambda j, t: (0, 0))
    else:
        rows_spec = pl.BlockSpec((TILE_ROWS, c), lambda j, t: (t, 0))
    out_shape = (num_out_rows, o) if scattered else (m, o)
    if scattered:  # the whole output; the tile's row indices place its rows
        out_spec = pl.BlockSpec(out_shape, lambda j, t: (0, 0))
    else:
        out_spec = pl.BlockSpec((TILE_ROWS, bo), lambda j, t: (t, j))
    name = "grouped_gemm_rows" + "_t" * contract_last
    name += "_gathered" * gathered + "_scaled" * scaled + "_scattered" * scattered
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, x.dtype),
        grid=(o // bo, m // TILE_ROWS),
        in_specs=[
            pl.BlockSpec(tile_group.shape, lambda j, t: (0,)),
            *(spec for spec, _ in per_row),
            rows_spec,
            pl.BlockSpec(w.shape, lambda j, t: (0, 0, 0)),
        ],
        out_specs=out_spec,
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps,
            num_stages=_stages(tiling.num_stages, x.dtype.itemsize, TILE_ROWS * bc + bc * bo),
        ),
        interpret=interpret(),
        name=name,
    )(tile_group, *(a for _, a in per_row), x, w)


def _weight_grad_kernel(tile_start_ref, *refs, block_rows, lhs_gathered, rhs_gathered):
    """out [bk, bn] = sum over the group's rows (in blocks of block_rows) of
    x[rows, k-block]^T dy[rows, n-block]; when lhs_gathered the x rows are x[lhs_rows[rows]],
    when rhs_gathered the dy rows are rhs_scale[rows] dy[rhs_rows[rows]] (scaled in fp32,
    rounded to dy's dtype), zero rows where an index is outside its source.  Grid (n-block,
    k-block, group): the group varies slowest, so the programs running together read one
    group's rows, from L2 after the first."""
    refs = list(refs)
    lhs_rows_ref = refs.pop(0) if lhs_gathered else None
    rhs_rows_ref, rhs_scale_ref = (refs.pop(0), refs.pop(0)) if rhs_gathered else (None, None)
    x_ref, dy_ref, out_ref = refs
    g = pl.program_id(2)
    block_k, block_n = out_ref.shape
    ks = pl.ds(pl.program_id(1) * block_k, block_k)
    ns = pl.ds(pl.program_id(0) * block_n, block_n)
    per_tile = TILE_ROWS // block_rows

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
        if lhs_gathered:
            a = _gather_rows(x_ref, *_source_rows(lhs_rows_ref[rows], x_ref.shape[0]), ks)
        else:
            a = x_ref[rows, ks]
        if rhs_gathered:
            b = _gather_rows(dy_ref, *_source_rows(rhs_rows_ref[rows], dy_ref.shape[0]), ns)
            b = (b.astype(jnp.float32) * rhs_scale_ref[rows][:, None]).astype(dy_ref.dtype)
        else:
            b = dy_ref[rows, ns]
        return acc + jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(
        tile_start_ref[g] * per_tile,
        tile_start_ref[g + 1] * per_tile,
        step,
        jnp.zeros((block_k, block_n), jnp.float32),
    )
    out_ref[...] = acc.astype(out_ref.dtype)


def _weight_grad(
    x: jax.Array,
    dy: jax.Array,
    tile_start: jax.Array,
    *,
    tiling: WeightTiling,
    lhs_rows: jax.Array | None = None,
    rhs_rows: jax.Array | None = None,
    rhs_scale: jax.Array | None = None,
) -> jax.Array:
    """x [M, K] (or, given lhs_rows [M], rows x[lhs_rows] of x [S, K]), dy [M, N] (or, given
    rhs_rows [M] and rhs_scale [M] fp32, rows rhs_scale[r] dy[rhs_rows[r]] of dy [T, N]),
    tile_start [G + 1] -> dW [G, K, N] in x's dtype."""
    lhs_gathered, rhs_gathered = lhs_rows is not None, rhs_rows is not None
    k, n, g = x.shape[1], dy.shape[1], tile_start.shape[0] - 1
    bk = _block(k, tiling.block_k, "weight-gradient rows (K)")
    bn = _block(n, tiling.block_n, "weight-gradient columns (N)")
    if TILE_ROWS % tiling.block_rows:
        raise ValueError(f"WeightTiling.block_rows={tiling.block_rows} must divide {TILE_ROWS}")
    whole = lambda a: pl.BlockSpec(a.shape, lambda j, i, e: (0,) * a.ndim)
    operands = [a for a in (tile_start, lhs_rows, rhs_rows, rhs_scale, x, dy) if a is not None]
    kernel = functools.partial(
        _weight_grad_kernel,
        block_rows=tiling.block_rows,
        lhs_gathered=lhs_gathered,
        rhs_gathered=rhs_gathered,
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, k, n), x.dtype),
        grid=(n // bn, k // bk, g),
        in_specs=[whole(a) for a in operands],
        out_specs=pl.BlockSpec((None, bk, bn), lambda j, i, e: (e, i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps,
            num_stages=_stages(tiling.num_stages, x.dtype.itemsize, tiling.block_rows * (bk + bn)),
        ),
        interpret=interpret(),
        name="grouped_gemm_weight_grad" + "_gathered" * lhs_gathered + "_dy_gathered_scaled" * rhs_gathered,
    )(*operands)


def tiled_grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    tilings: Tilings = DEFAULT_TILINGS,
    *,
    lhs_rows: jax.Array | None = None,
    lhs_copies: jax.Array | None = None,
    out_rows: jax.Array | None = None,
    out_weights: jax.Array | None = None,
) -> jax.Array:
    """y [M, N] with y[r] = x[r] W[g(r)], for x [M, K] in tile-aligned group layout (M a
    multiple of TILE_ROWS, every group_sizes[g] a multiple of TILE_ROWS, sum <= M) and
    W [G, K, N] of x's dtype.  Rows past sum(group_sizes) give zeros.  Differentiable in x
    and W (all three products run as Pallas kernels).

    Gathered rows: given lhs_rows [M] (int) and its inverse lhs_copies [S, C] (the rows r with
    lhs_rows[r] = s, padded with M; every r with lhs_rows[r] in [0, S) listed exactly once),
    y[r] = x[lhs_rows[r]] W[g(r)] for x [S, K] (a zero row where lhs_rows[r] is outside
    [0, S)): the row gather runs inside the forward and weight-gradient kernels, and
    dx[s] = sum_c dx_sorted[lhs_copies[s, c]].

    Combined rows: given out_rows [M] (int: where each product row goes, a in [0, T P); every
    such a the target of exactly one row r, rows outside that range go nowhere) and
    out_weights [T, P], the result is instead the weighted combine, in fp32,
        out[t] = sum_p out_weights[t, p] z[t P + p]        [T, N],   z[out_rows[r]] = y[r]
    (out_weights rounded to x's dtype, as `expert_compute.combine` does): the forward kernel
    stores its rows straight into z's order (a scatter store), and the backward kernels read
    the rows out_weights.flat[a] d_out[a // P] (a = out_rows[r]) in their loads, so neither
    z's collect gather from y nor the gather of its gradient back into y's order is written.
    Also differentiable in out_weights: d_weights[t, p] = <z[t P + p], d_out[t]>."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped GEMM: x {x.shape} and W {w.shape} must be [M, K] and [G, K, N]")
    if (lhs_rows is None) != (lhs_copies is None):
        raise ValueError("grouped GEMM: lhs_rows and lhs_copies (its inverse) go together; pass both")
    if (out_rows is None) != (out_weights is None):
        raise ValueError("grouped GEMM: out_rows and out_weights (the combine) go together; pass both")
    if lhs_rows is not None and (lhs_rows.ndim != 1 or lhs_copies.ndim != 2 or len(lhs_copies) != len(x)):
        raise ValueError(
            f"grouped GEMM: lhs_rows {lhs_rows.shape} and lhs_copies {lhs_copies.shape} must be "
            f"[M] and [S, C] with S = {len(x)} rows of x"
        )
    rows = x.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    if rows % TILE_ROWS:
        raise ValueError(
            f"grouped GEMM: {rows} rows are not a multiple of the row tile "
            f"{TILE_ROWS}; lay the rows out with expert_compute.dropless_slots"
        )
    if out_rows is not None and (out_rows.shape != (rows,) or out_weights.ndim != 2):
        raise ValueError(
            f"grouped GEMM: out_rows {out_rows.shape} and out_weights {out_weights.shape} must be "
            f"[M] = [{rows}] and [T, P]"
        )
    w, group_sizes = w.astype(x.dtype), group_sizes.astype(jnp.int32)
    gather = None if lhs_rows is None else (lhs_rows.astype(jnp.int32), lhs_copies.astype(jnp.int32))
    combine = None if out_rows is None else (out_rows.astype(jnp.int32), out_weights)
    return _grouped(x, w, group_sizes, gather, combine, tilings)


def sum_copies(rows: jax.Array, copies: jax.Array) -> jax.Array:
    """rows [M, ...], copies [S, C] -> [S, ...] with out[s] = sum_c rows[copies[s, c]] (indices
    outside [0, M) add nothing): the transpose of the row gather x[lhs_rows], fp32 sums."""
    taken = jnp.take(rows, copies, axis=0, mode="fill", fill_value=0)
    return jnp.sum(taken.astype(jnp.float32), axis=1).astype(rows.dtype)


def _combine(z: jax.Array, weights: jax.Array) -> jax.Array:
    """z [T P, N], weights [T, P] -> out [T, N] = sum_p weights[t, p] z[t P + p] (fp32)."""
    t, p = weights.shape
    return jnp.einsum(
        "tpn,tp->tn", z.reshape(t, p, -1), weights.astype(z.dtype), preferred_element_type=jnp.float32
    )


def _combined_rows(out_rows: jax.Array, weights: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """The transpose of the combine, per product row r with a = out_rows[r]: d_y[r] =
    scale[r] d_out[rows[r]] with rows[r] = a // P (T where a is outside [0, T P): a zero row) and
    scale[r] = weights.flat[a] (fp32 of the dtype-rounded weight the forward used; 0 outside)."""
    t, p = weights.shape
    a, valid = _source_rows(out_rows, t * p)
    scale = weights.reshape(-1).astype(dtype).astype(jnp.float32)[a]
    return jnp.where(valid, a // p, t), jnp.where(valid, scale, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _grouped(x, w, group_sizes, gather, combine, tilings):
    """tiled_grouped_matmul with gather = (lhs_rows, lhs_copies) or None and combine =
    (out_rows, out_weights) or None."""
    return _grouped_fwd(x, w, group_sizes, gather, combine, tilings)[0]


def _grouped_fwd(x, w, group_sizes, gather, combine, tilings):
    lhs_rows = None if gather is None else gather[0]
    rows = x.shape[0] if gather is None else lhs_rows.shape[0]
    tile_group, tile_start = tile_groups(group_sizes, rows // TILE_ROWS)
    product = functools.partial(
        _row_matmul, x, w, tile_group, contract_last=False, tiling=tilings.forward, lhs_rows=lhs_rows
    )
    if combine is None:
        return product(), (x, w, gather, None, tile_group, tile_start)
    out_rows, weights = combine
    z = product(out_rows=out_rows, num_out_rows=weights.size)
    return _combine(z, weights), (x, w, gather, (out_rows, weights, z), tile_group, tile_start)


def _grouped_bwd(tilings, residuals, dy):
    x, w, gather, combined, tile_group, tile_start = residuals
    dy = dy.astype(x.dtype)
    if combined is None:  # dy [M, N] in the rows' order
        dy_rows = dy_scale = d_combine = None
    else:  # dy [T, N]: each product row reads its weighted token row
        out_rows, weights, z = combined
        dy_rows, dy_scale = _combined_rows(out_rows, weights, x.dtype)
        d_weights = jnp.einsum(
            "tpn,tn->tp", z.reshape(*weights.shape, -1), dy, preferred_element_type=jnp.float32
        )
        d_combine = (None, d_weights.astype(weights.dtype))
    dx = _row_matmul(
        dy, w, tile_group, contract_last=True, tiling=tilings.input_grad, lhs_rows=dy_rows, row_scale=dy_scale
    )
    lhs_rows = None if gather is None else gather[0]
    gathered = gather is not None or combined is not None
    dw = _weight_grad(
        x,
        dy,
        tile_start,
        tiling=tilings.weight_grad_gathered if gathered else tilings.weight_grad,
        lhs_rows=lhs_rows,
        rhs_rows=dy_rows,
        rhs_scale=dy_scale,
    )
    if gather is not None:
        dx = sum_copies(dx, gather[1])
    return dx, dw, None, None, d_combine


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
