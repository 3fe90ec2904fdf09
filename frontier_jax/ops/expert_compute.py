"""The pieces of routed-expert computation shared by the single-device MoE layer and the
expert-parallel (all-to-all) path.

Assignments: each of N tokens picks K experts, giving A = N K (token, expert) assignments,
flattened token-major (assignment a = token a // K, choice a % K).  Each assignment gets a
row ("slot") of a buffer laid out group by group; rows move in one gather each way:

    dispatch   buf[slot[a]] = x[a // K]           [N, d] -> [R, d]   (unused rows zero)
               (or not written at all: `dispatch_gather` gives the grouped GEMM the map
               buf[r] = x[rows[r]] to gather in its loads, `impl.gmm_gather=fused`)
    collect    rows[a]      = buf[slot[a]]        [R, d] -> [A, d]   (dropped rows zero)
    combine    y_n          = sum_k g_{n,k} rows[n K + k]
               (or the buffer never written: `combine_scatter` gives the down GEMM the map
               rows[a[r]] = buf[r] to store its rows by, `impl.gmm_gather=fused`)

Layouts (`slot` == R means dropped):
  * dropless: group g's rows start at a multiple of `align` (1 = packed; the Pallas grouped
    GEMM needs its row tile) -- R = the static bound `padded_rows_bound(A, G, align)`;
  * capacity: group g owns rows [g C, (g+1) C); the (C+1)-th and later assignments of a group
    (in token order) are dropped -- R = G C (with fp8 experts each group's rows start at a
    multiple of the 128-row tile: stride S = C rounded up, R = G S).  Assignments marked
    invalid (padding tokens) take no row and do not count towards C.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.kernels.grouped_gemm import padded_groups
from frontier_jax.ops.grouped_matmul import RowCombine, RowGather, grouped_matmul
from frontier_jax.precision.mixed import einsum_fp32


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [M, ...] -> x[index] with index == M meaning a zero row (a gather that fills
    out-of-range rows, not a copy of x with a zero row appended)."""
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def move_rows(x: jax.Array, index: jax.Array, inverse: jax.Array) -> jax.Array:
    """out[i] = x[index[i]] (a zero row where index[i] == len(x)), for a one-to-one partial map:
    `inverse[j]` is the output row that x's row j lands in (len(out) if none).

    The gradient is again a gather, g_x = g_out[inverse], instead of the scatter-add XLA would
    emit for a general gather -- on GPUs scatters of [tokens x K, d] rows dominated the MoE."""
    return _take(x, index)


def _move_rows_fwd(x, index, inverse):
    return _take(x, index), (index, inverse)


def _move_rows_bwd(res, g):
    index, inverse = res
    return _take(g, inverse), None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def invert(index: jax.Array, size: int) -> jax.Array:
    """Inverse of a one-to-one partial map index [A] into [0, size] (size = nowhere):
    result [size] with result[index[a]] = a, and A where no a maps."""
    fill = jnp.full((size + 1,), index.shape[0], index.dtype)
    return fill.at[index].set(jnp.arange(index.shape[0], dtype=index.dtype))[:size]


def rank_in_group(groups: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
    """groups [A] int in [0, G) -> (rank [A]: how many earlier assignments share the group,
    sizes [G]: assignments per group).  A stable sort gives the ranks in one pass."""
    order = jnp.argsort(groups, stable=True)
    sizes = jnp.bincount(groups, length=num_groups).astype(jnp.int32)
    ordered = groups[order]
    sorted_rank = jnp.arange(groups.shape[0], dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[ordered]
    return jnp.zeros_like(sorted_rank).at[order].set(sorted_rank, unique_indices=True), sizes


def _materialized(*arrays):
    """The arrays, computed once into memory: without the barrier XLA fuses the slot arithmetic
    (cumsum over groups, gathers) into every consumer, i.e. recomputes it per element of the
    [tokens, d] row gathers -- measured at 110 ms of a 350 ms bench-1b step on an H100."""
    return jax.lax.optimization_barrier(arrays)


def dropless_slots(groups: jax.Array, num_groups: int, align: int = 1) -> tuple[jax.Array, jax.Array]:
    """groups [A] -> (slot [A], group_sizes [G]: rows each group occupies, padded to `align`).
    Group g starts at sum_{h<g} group_sizes[h]; padding rows stay zero."""
    rank, sizes = rank_in_group(groups, num_groups)
    padded, start = padded_groups(sizes, align)
    return _materialized(start[groups] + rank, padded)


def capacity_slots(
    groups: jax.Array,
    num_groups: int,
    capacity: int,
    stride: int | None = None,
    valid: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """groups [A] -> (slot [A], keep [A] bool): the r-th valid assignment of group g (token
    order) goes to row g S + r if r < C, else it is dropped (slot G S); invalid ones (valid [A]
    False: padding) get no row and no rank.  The stride S >= C (default C) leaves rows
    [g S + C, (g+1) S) empty, e.g. to align groups to a kernel's row tile."""
    stride = capacity if stride is None else stride
    if valid is None:
        rank, _ = rank_in_group(groups, num_groups)
        keep = rank < capacity
    else:  # invalid assignments rank in an extra group of their own
        rank, _ = rank_in_group(jnp.where(valid, groups, num_groups), num_groups + 1)
        keep = valid & (rank < capacity)
    return _materialized(jnp.where(keep, groups * stride + rank, num_groups * stride), keep)


def dispatch(x: jax.Array, slot: jax.Array, num_rows: int) -> jax.Array:
    """Token rows x [N, d] -> buffer [R, d] with x[a // K] at row slot[a] (K = A / N)."""
    k = slot.shape[0] // x.shape[0]
    return move_rows(jnp.repeat(x, k, axis=0), invert(slot, num_rows), slot)


def dispatch_gather(slot: jax.Array, num_tokens: int, num_rows: int) -> RowGather:
    """`dispatch` of N = num_tokens token rows as a row gather for the grouped GEMM to run in
    its loads: buffer row r reads token rows[r] = invert(slot)[r] // K (N: an unused row, zero),
    and token n's K copies are the buffer rows copies[n] = slot[n K : (n+1) K] (R: dropped)."""
    k = slot.shape[0] // num_tokens
    return RowGather(invert(slot, num_rows) // k, slot.reshape(num_tokens, k))


def combine_scatter(slot: jax.Array, weights: jax.Array, num_rows: int) -> RowCombine:
    """`combine(collect(buf, slot), weights)` as a row map for the grouped GEMM to run in its
    stores: buffer row r is assignment invert(slot)[r] (A: an unused row), and token n sums its
    K assignments n K + k with the gates weights [N, K]."""
    return RowCombine(invert(slot, num_rows), weights)


def collect(buf: jax.Array, slot: jax.Array) -> jax.Array:
    """Buffer [R, d] -> assignment rows [A, d] = buf[slot], zero for dropped assignments."""
    return move_rows(buf, slot, invert(slot, buf.shape[0]))


def combine(rows: jax.Array, weights: jax.Array) -> jax.Array:
    """Assignment rows [N K, d] (token-major) and gates [N, K] -> y_n = sum_k g_{n,k} y_{n,k}
    [N, d] (fp32 accumulation)."""
    n, k = weights.shape
    return einsum_fp32("nkd,nk->nd", rows.reshape(n, k, -1), weights.astype(rows.dtype))


def swiglu_grouped(
    xs: jax.Array,
    group_sizes: jax.Array,
    w_gate,
    w_up,
    w_down,
    *,
    impl: str,
    dtype,
    policy=None,
    gather: RowGather | None = None,
    combine: RowCombine | None = None,
) -> jax.Array:
    """Per-group SwiGLU over rows laid out group by group: xs [R, d] -> [R, d]; weights
    [G, d, f], [G, d, f], [G, f, d]; rows past sum(group_sizes) give zeros.  `policy` (a
    PrecisionPolicy) may run the three matmuls (`moe.experts.w_gate/w_up/w_down`) in fp8.
    Gate and up run as one grouped matmul against [W_gate | W_up] ([G, d, 2f]: one pass (and
    one quantization) of xs, and one input-gradient product instead of two plus a sum) unless
    the policy runs one of them in fp8 and the other not.  Given `gather` (a RowGather, where
    `grouped_matmul.fuses_gather`), xs are the source rows x [S, d] and the rows are x[gather.rows],
    gathered inside the gate/up kernel; given `combine` (a RowCombine, there too), the down kernel
    stores its rows in assignment order and the result is their combine y [N, d] (fp32)."""

    def gmm(a, w, layer, **row_maps):
        return grouped_matmul(
            a, w, group_sizes, impl=impl, dtype=dtype, policy=policy, layer=layer, **row_maps
        )

    gate_layer, up_layer = "moe.experts.w_gate", "moe.experts.w_up"
    if policy is not None and policy.uses_fp8(gate_layer) != policy.uses_fp8(up_layer):
        gate, up = gmm(xs, w_gate, gate_layer, gather=gather), gmm(xs, w_up, up_layer, gather=gather)
    else:
        w_gate_up = jnp.concatenate([w_gate, w_up], axis=2)
        gate, up = jnp.split(gmm(xs, w_gate_up, f"{gate_layer}+{up_layer}", gather=gather), 2, axis=1)
    return gmm(jax.nn.silu(gate) * up, w_down, "moe.experts.w_down", combine=combine)


def swiglu_batched(xb: jax.Array, w_gate, w_up, w_down, *, dtype) -> jax.Array:
    """Per-group SwiGLU on a capacity buffer xb [G, C, d] -> [G, C, d] (batched matmuls)."""
    mm = lambda a, w, eq: einsum_fp32(eq, a.astype(dtype), w.astype(dtype)).astype(dtype)
    h = jax.nn.silu(mm(xb, w_gate, "gcd,gdf->gcf")) * mm(xb, w_up, "gcd,gdf->gcf")
    return mm(h, w_down, "gcf,gfd->gcd")
