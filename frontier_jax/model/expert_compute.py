"""The pieces of routed-expert computation shared by the single-device MoE layer and the
expert-parallel (all-to-all) path.

Assignments: each of N tokens picks K experts, giving N K (token, expert) assignments,
flattened token-major (assignment a = token a // K, choice a % K).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.model.grouped_matmul import grouped_matmul


def sort_assignments(groups: jax.Array) -> tuple[jax.Array, jax.Array]:
    """groups [A] int -> (order [A] that sorts assignments by group (stable), its inverse)."""
    order = jnp.argsort(groups, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(groups.shape[0], dtype=order.dtype))
    return order, inverse


def capacity_slots(sorted_groups: jax.Array, num_groups: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Buffer slots for assignments already sorted by group: the r-th assignment of group g goes
    to slot g * capacity + r if r < capacity (kept), else to the overflow slot
    num_groups * capacity (dropped).  Returns (slot [A], keep [A] bool)."""
    sizes = jnp.bincount(sorted_groups, length=num_groups)
    rank = jnp.arange(sorted_groups.shape[0]) - (jnp.cumsum(sizes) - sizes)[sorted_groups]
    keep = rank < capacity
    return jnp.where(keep, sorted_groups * capacity + rank, num_groups * capacity), keep


def scatter_to_slots(rows: jax.Array, slot: jax.Array, num_slots: int, fill=0) -> jax.Array:
    """rows [A, ...] -> buffer [num_slots, ...] with rows[a] at slot[a]; slot == num_slots
    (overflow) is discarded; unused slots hold `fill`."""
    buf = jnp.full((num_slots + 1,) + rows.shape[1:], fill, rows.dtype)
    return buf.at[slot].set(rows)[:num_slots]


def gather_from_slots(buf: jax.Array, slot: jax.Array) -> jax.Array:
    """buf [num_slots, d] -> rows [A, d] = buf[slot], zero for the overflow slot."""
    return jnp.concatenate([buf, jnp.zeros((1,) + buf.shape[1:], buf.dtype)])[slot]


def swiglu_grouped(xs: jax.Array, group_sizes: jax.Array, w_gate, w_up, w_down, *, impl: str,
                   dtype) -> jax.Array:
    """Per-group SwiGLU over rows sorted by group: xs [M, d] -> [M, d]; weights [G, d, f],
    [G, d, f], [G, f, d]; rows past sum(group_sizes) give zeros."""
    gmm = lambda a, w: grouped_matmul(a, w, group_sizes, impl=impl, dtype=dtype)
    return gmm(jax.nn.silu(gmm(xs, w_gate)) * gmm(xs, w_up), w_down)


def swiglu_batched(xb: jax.Array, w_gate, w_up, w_down, *, dtype) -> jax.Array:
    """Per-group SwiGLU on a capacity buffer xb [G, C, d] -> [G, C, d] (batched matmuls)."""
    mm = lambda a, w, eq: jnp.einsum(eq, a.astype(dtype), w.astype(dtype),
                                     preferred_element_type=jnp.float32).astype(dtype)
    h = jax.nn.silu(mm(xb, w_gate, "gcd,gdf->gcf")) * mm(xb, w_up, "gcd,gdf->gcf")
    return mm(h, w_down, "gcf,gfd->gcd")


def combine(ys_sorted: jax.Array, inverse: jax.Array, weights: jax.Array) -> jax.Array:
    """Expert outputs of sorted assignments [N K, d] -> y_n = sum_k g_{n,k} y_{n,k} [N, d]
    (fp32 accumulation), given the inverse sort permutation and the gates [N, K]."""
    n, k = weights.shape
    y_assign = ys_sorted[inverse].reshape(n, k, -1)
    return jnp.einsum("nkd,nk->nd", y_assign, weights.astype(ys_sorted.dtype),
                      preferred_element_type=jnp.float32)
