"""The pieces of routed-expert computation shared by the single-device MoE layer and the
expert-parallel (all-to-all) path.

Assignments: each of N tokens picks K experts, giving N K (token, expert) assignments,
flattened token-major (assignment a = token a // K, choice a % K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.model.grouped_matmul import grouped_matmul


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [M, ...] -> x[index] with index == M meaning a zero row."""
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[index]


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


def sort_assignments(groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """groups [A] int -> (order [A] that sorts assignments by group (stable), its inverse)."""
    order = jnp.argsort(groups, stable=True)
    return order, invert(order, groups.shape[0])


def invert(index: jax.Array, size: int) -> jax.Array:
    """Inverse of a one-to-one partial map index [A] into [0, size] (size = nowhere):
    result [size] with result[index[a]] = a, and A where no a maps."""
    fill = jnp.full((size + 1,), index.shape[0], index.dtype)
    return fill.at[index].set(jnp.arange(index.shape[0], dtype=index.dtype))[:size]


def capacity_slots(sorted_groups: jax.Array, num_groups: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Buffer slots for assignments already sorted by group: the r-th assignment of group g goes
    to slot g * capacity + r if r < capacity (kept), else to the overflow slot
    num_groups * capacity (dropped).  Returns (slot [A], keep [A] bool)."""
    sizes = jnp.bincount(sorted_groups, length=num_groups)
    rank = jnp.arange(sorted_groups.shape[0]) - (jnp.cumsum(sizes) - sizes)[sorted_groups]
    keep = rank < capacity
    return jnp.where(keep, sorted_groups * capacity + rank, num_groups * capacity), keep


def to_slots(rows: jax.Array, slot: jax.Array, num_slots: int) -> jax.Array:
    """rows [A, d] -> buffer [num_slots, d] with rows[a] at slot[a] (slot == num_slots:
    dropped); unused slots are zero."""
    return move_rows(rows, invert(slot, num_slots), slot)


def from_slots(buf: jax.Array, slot: jax.Array) -> jax.Array:
    """buffer [num_slots, d] -> rows [A, d] = buf[slot], zero for dropped rows."""
    return move_rows(buf, slot, invert(slot, buf.shape[0]))


def gather_assignments(x: jax.Array, order: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    """Token rows x [N, d] -> assignment rows sorted by `order` [N K, d] (token a // K)."""
    return move_rows(jnp.repeat(x, k, axis=0), order, inverse)


def swiglu_grouped(xs: jax.Array, group_sizes: jax.Array, w_gate, w_up, w_down, *, impl: str,
                   dtype, policy=None) -> jax.Array:
    """Per-group SwiGLU over rows sorted by group: xs [M, d] -> [M, d]; weights [G, d, f],
    [G, d, f], [G, f, d]; rows past sum(group_sizes) give zeros.  `policy` (a PrecisionPolicy)
    may run the three matmuls (`moe.experts.w_gate/w_up/w_down`) in fp8."""
    def gmm(a, w, name):
        return grouped_matmul(a, w, group_sizes, impl=impl, dtype=dtype, policy=policy,
                              layer=f"moe.experts.{name}")

    return gmm(jax.nn.silu(gmm(xs, w_gate, "w_gate")) * gmm(xs, w_up, "w_up"), w_down, "w_down")


def swiglu_batched(xb: jax.Array, w_gate, w_up, w_down, *, dtype) -> jax.Array:
    """Per-group SwiGLU on a capacity buffer xb [G, C, d] -> [G, C, d] (batched matmuls)."""
    mm = lambda a, w, eq: jnp.einsum(eq, a.astype(dtype), w.astype(dtype),
                                     preferred_element_type=jnp.float32).astype(dtype)
    h = jax.nn.silu(mm(xb, w_gate, "gcd,gdf->gcf")) * mm(xb, w_up, "gcd,gdf->gcf")
    return mm(h, w_down, "gcf,gfd->gcd")


def combine(ys_sorted: jax.Array, order: jax.Array, inverse: jax.Array, weights: jax.Array) -> jax.Array:
    """Expert outputs of sorted assignments [N K, d] -> y_n = sum_k g_{n,k} y_{n,k} [N, d]
    (fp32 accumulation), given the sort permutation, its inverse and the gates [N, K]."""
    n, k = weights.shape
    y_assign = move_rows(ys_sorted, inverse, order).reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y_assign, weights.astype(ys_sorted.dtype),
                      preferred_element_type=jnp.float32)
