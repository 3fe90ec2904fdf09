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


def _row_kernel(tile_group_ref, x_ref, w_ref, out_ref, *, num_groups, block_contract, contract_last):
    """out tile [R, bo] = x tile [R, C] @ W[g] (C-blocks), W[g] stored [C, O] or, when
    contract_last, [O, C].  Grid (column block, row tile): the column block varies fastest,
    so the programs running together share row tiles (and groups) in L2 instead of each
    row tile being read from memory once per column block."""
    group = tile_group_ref[pl.program_id(1)]
    rows, block_out = out_ref.shape
    contract = x_ref.shape[1]
    cols = pl.ds(pl.program_id(0) * block_out, block_out)

    @pl.when(group < num_groups)
    def _():
        def step(i, acc):
            c = pl.ds(pl.multiple_of(i * block_contract, block_contract), block_contract)
            a = x_ref[:, c]
            if contract_last:
                b = w_ref[group, cols, c]
                dims = (((1,), (1,)), ((), ()))
            else:
                b = w_ref[group, c, cols]
                dims = (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(
            0, contract // block_contract, step, jnp.zeros((rows, block_out), jnp.float32)
        )
        out_ref[...] = acc.astype(out_ref.dtype)

    @pl.when(group >= num_groups)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _row_matmul(
    x: jax.Array, w: jax.Array, tile_group: jax.Array, *, contract_last: bool, tiling: RowTiling
) -> jax.Array:
    """x [M, C] rows, W [G, C, O] (or [G, O, C] when contract_last) -> [M, O]."""
    m, c = x.shape
    g = w.shape[0]
    o = w.shape[1] if contract_last else w.shape[2]
    bo = _block(o, tiling.block_out, "output width")
    bc = _block(c, tiling.block_contract, "contraction width")
    kernel = functools.partial(_row_kernel, num_groups=g, block_contract=bc, contract_last=contract_last)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, o), x.dtype),
        grid=(o // bo, m // TILE_ROWS),
        in_specs=[
            pl.BlockSpec(tile_group.shape, lambda j, t: (0,)),
            pl.BlockSpec((TILE_ROWS, c), lambda j, t: (t, 0)),
            pl.BlockSpec(w.shape, lambda j, t: (0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((TILE_ROWS, bo), lambda j, t: (t, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps,
            num_stages=_stages(tiling.num_stages, x.dtype.itemsize, TILE_ROWS * bc + bc * bo),
        ),
        interpret=interpret(),
        name="grouped_gemm_rows_t" if contract_last else "grouped_gemm_rows",
    )(tile_group, x, w)


def _weight_grad_kernel(tile_start_ref, x_ref, dy_ref, out_ref, *, block_rows):
    """out [bk, bn] = sum over the group's rows (in blocks of block_rows) of
    x[rows, k-block]^T dy[rows, n-block].  Grid (n-block, k-block, group): the group varies
    slowest, so the programs running together read one group's rows, from L2 after the first."""
    g = pl.program_id(2)
    block_k, block_n = out_ref.shape
    ks = pl.ds(pl.program_id(1) * block_k, block_k)
    ns = pl.ds(pl.program_id(0) * block_n, block_n)
    per_tile = TILE_ROWS // block_rows

    def step(i, acc):
        rows = pl.ds(pl.multiple_of(i * block_rows, block_rows), block_rows)
        return acc + jax.lax.dot_general(
            x_ref[rows, ks], dy_ref[rows, ns], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )

    acc = jax.lax.fori_loop(
        tile_start_ref[g] * per_tile,
        tile_start_ref[g + 1] * per_tile,
        step,
        jnp.zeros((block_k, block_n), jnp.float32),
    )
    out_ref[...] = acc.astype(out_ref.dtype)


def _weight_grad(x: jax.Array, dy: jax.Array, tile_start: jax.Array, *, tiling: WeightTiling) -> jax.Array:
    """x [M, K], dy [M, N], tile_start [G + 1] -> dW [G, K, N] in x's dtype."""
    k, n, g = x.shape[1], dy.shape[1], tile_start.shape[0] - 1
    bk = _block(k, tiling.block_k, "weight-gradient rows (K)")
    bn = _block(n, tiling.block_n, "weight-gradient columns (N)")
    if TILE_ROWS % tiling.block_rows:
        raise ValueError(f"WeightTiling.block_rows={tiling.block_rows} must divide {TILE_ROWS}")
    return pl.pallas_call(
        functools.partial(_weight_grad_kernel, block_rows=tiling.block_rows),
        out_shape=jax.ShapeDtypeStruct((g, k, n), x.dtype),
        grid=(n // bn, k // bk, g),
        in_specs=[
            pl.BlockSpec(tile_start.shape, lambda j, i, e: (0,)),
            pl.BlockSpec(x.shape, lambda j, i, e: (0, 0)),
            pl.BlockSpec(dy.shape, lambda j, i, e: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bk, bn), lambda j, i, e: (e, i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=tiling.num_warps,
            num_stages=_stages(tiling.num_stages, x.dtype.itemsize, tiling.block_rows * (bk + bn)),
        ),
        interpret=interpret(),
        name="grouped_gemm_weight_grad",
    )(tile_start, x, dy)


def tiled_grouped_matmul(
    x: jax.Array, w: jax.Array, group_sizes: jax.Array, tilings: Tilings = DEFAULT_TILINGS
) -> jax.Array:
    """y [M, N] with y[r] = x[r] W[g(r)], for x [M, K] in tile-aligned group layout (M a
    multiple of TILE_ROWS, every group_sizes[g] a multiple of TILE_ROWS, sum <= M) and
    W [G, K, N] of x's dtype.  Rows past sum(group_sizes) give zeros.  Differentiable in x
    and W (all three products run as Pallas kernels)."""
    if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped GEMM: x {x.shape} and W {w.shape} must be [M, K] and [G, K, N]")
    if x.shape[0] % TILE_ROWS:
        raise ValueError(
            f"grouped GEMM: {x.shape[0]} rows are not a multiple of the row tile "
            f"{TILE_ROWS}; lay the rows out with expert_compute.dropless_slots"
        )
    return _grouped(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), tilings)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _grouped(x, w, group_sizes, tilings):
    return _grouped_fwd(x, w, group_sizes, tilings)[0]


def _grouped_fwd(x, w, group_sizes, tilings):
    tile_group, tile_start = tile_groups(group_sizes, x.shape[0] // TILE_ROWS)
    y = _row_matmul(x, w, tile_group, contract_last=False, tiling=tilings.forward)
    return y, (x, w, tile_group, tile_start)


def _grouped_bwd(tilings, residuals, dy):
    x, w, tile_group, tile_start = residuals
    dy = dy.astype(x.dtype)
    dx = _row_matmul(dy, w, tile_group, contract_last=True, tiling=tilings.input_grad)
    dw = _weight_grad(x, dy, tile_start, tiling=tilings.weight_grad)
    return dx, dw, None


_grouped.defvjp(_grouped_fwd, _grouped_bwd)
