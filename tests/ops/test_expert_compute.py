"""The row-moving primitives of expert dispatch: values and gradients equal plain indexing,
and the buffer layouts equal naive loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels.grouped_gemm import padded_rows_bound, sum_copies
from frontier_jax.ops.expert_compute import (
    capacity_slots,
    collect,
    combine,
    combine_scatter,
    dispatch,
    dispatch_gather,
    dropless_slots,
    invert,
    move_rows,
)


def _plain_take(x, index):
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:])])[index]


def test_move_rows_gradient_equals_indexing_gradient_for_partial_maps():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)
    index = jnp.asarray([3, 7, 0, 6, 7, 1], jnp.int32)  # 7 = zero row; rows 2, 4, 5 unused
    inverse = invert(index, 7)
    np.testing.assert_array_equal(inverse, [2, 5, 6, 0, 6, 6, 3])
    cot = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    ours = jax.grad(lambda x: jnp.sum(move_rows(x, index, inverse) * cot))(x)
    plain = jax.grad(lambda x: jnp.sum(_plain_take(x, index) * cot))(x)
    np.testing.assert_array_equal(move_rows(x, index, inverse), _plain_take(x, index))
    np.testing.assert_array_equal(ours, plain)


def _naive_layout(groups, num_groups, align=1, capacity=None):
    """Slots by a Python loop: group g's rows start at its (padded) offset, token order."""
    groups = np.asarray(groups)
    sizes = np.bincount(groups, minlength=num_groups)
    rows = sizes if capacity is None else np.full(num_groups, capacity)
    rows = -(-rows // align) * align
    start = np.cumsum(rows) - rows
    seen = np.zeros(num_groups, int)
    slot = []
    for g in groups:
        r = seen[g]
        seen[g] += 1
        slot.append(start[g] + r if capacity is None or r < capacity else num_groups * capacity)
    return np.array(slot), rows


@pytest.mark.parametrize("align", [1, 4])
def test_dropless_slots_match_a_naive_layout(align):
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 5, (23,))
    groups[groups == 3] = 1  # an empty group
    slot, sizes = dropless_slots(jnp.asarray(groups, jnp.int32), 5, align)
    naive_slot, naive_sizes = _naive_layout(groups, 5, align)
    np.testing.assert_array_equal(slot, naive_slot)
    np.testing.assert_array_equal(sizes, naive_sizes)
    assert int(sizes.sum()) <= padded_rows_bound(23, 5, align)
    assert padded_rows_bound(23, 5, align) % align == 0


def test_capacity_slots_keep_the_first_assignments_in_token_order():
    groups = np.array([2, 0, 2, 2, 1, 2, 0])
    slot, keep = capacity_slots(jnp.asarray(groups, jnp.int32), 3, 2)
    naive_slot, _ = _naive_layout(groups, 3, capacity=2)
    np.testing.assert_array_equal(slot, naive_slot)
    np.testing.assert_array_equal(keep, [True, True, True, False, True, False, True])


def test_capacity_slots_give_invalid_assignments_no_row_and_no_rank():
    # assignments 0 and 2 (padding) are invalid: group 2's valid ones are 3 and 5, both kept;
    # group 0 keeps 1 and 6.  Rows as if the invalid assignments were not there.
    groups = np.array([2, 0, 2, 2, 1, 2, 0])
    valid = np.array([False, True, False, True, True, True, True])
    slot, keep = capacity_slots(jnp.asarray(groups, jnp.int32), 3, 2, valid=jnp.asarray(valid))
    np.testing.assert_array_equal(keep, [False, True, False, True, True, True, True])
    np.testing.assert_array_equal(slot, [6, 0, 6, 4, 2, 5, 1])


def test_dispatch_collect_combine_values_and_gradient():
    # each group's buffer rows are scaled by (group + 1), so a row placed in the wrong group
    # changes the result; the reference keeps, by a Python loop, the first `capacity`
    # assignments of each group in token order: y_n = sum_k g_nk [kept_nk] (e_nk + 1) x_n
    rng = np.random.default_rng(1)
    n, k, groups, capacity, d = 6, 2, 3, 3, 4
    experts_np = rng.integers(0, groups, (n, k))
    experts = jnp.asarray(experts_np.reshape(-1), jnp.int32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    gates = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    slot, _ = capacity_slots(experts, groups, capacity)
    scale = jnp.arange(1, groups + 1, dtype=jnp.float32)[:, None, None]

    def through_buffer(x):
        buf = dispatch(x, slot, groups * capacity).reshape(groups, capacity, d) * scale
        return combine(collect(buf.reshape(groups * capacity, d), slot), gates)

    seen, kept = np.zeros(groups, int), np.zeros((n, k))
    for t in range(n):
        for j in range(k):
            kept[t, j] = seen[experts_np[t, j]] < capacity
            seen[experts_np[t, j]] += 1
    assert 0 < kept.sum() < n * k  # some assignments drop
    factor = np.asarray(gates, np.float64) * kept * (experts_np + 1)  # [n, k]
    x64, cot = np.asarray(x, np.float64), rng.normal(size=(n, d))
    np.testing.assert_allclose(through_buffer(x), factor.sum(1)[:, None] * x64, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(through_buffer(x) * jnp.asarray(cot, jnp.float32)))(x)
    np.testing.assert_allclose(grad, factor.sum(1)[:, None] * cot, rtol=1e-6)
    buf = np.asarray(dispatch(x, slot, groups * capacity))
    used = np.zeros(groups * capacity, bool)
    for g in range(groups):
        used[g * capacity : g * capacity + min(seen[g], capacity)] = True
    assert not buf[~used].any()  # unused rows are zero


def test_dispatch_gather_is_the_map_dispatch_writes_and_sum_copies_its_gradient():
    # dropless (aligned, with padding rows) and capacity (with dropped assignments) slots: the
    # gathered rows x[rows] equal dispatch's buffer, and sum_copies of a buffer cotangent equals
    # dispatch's gradient (fp32, exact up to summation order: rtol 1e-6)
    rng = np.random.default_rng(5)
    n, k, groups, d = 10, 3, 4, 5
    experts = jnp.asarray(rng.integers(0, groups, n * k), jnp.int32)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    aligned, _ = dropless_slots(experts, groups, 4)
    capped, keep = capacity_slots(experts, groups, 5)
    assert not keep.all()
    for slot, rows in ((aligned, padded_rows_bound(n * k, groups, 4)), (capped, groups * 5)):
        gather = dispatch_gather(slot, n, rows)
        buf, vjp = jax.vjp(lambda x: dispatch(x, slot, rows), x)
        np.testing.assert_array_equal(jnp.take(x, gather.rows, axis=0, mode="fill", fill_value=0), buf)
        cot = jnp.asarray(rng.normal(size=buf.shape), jnp.float32)
        np.testing.assert_allclose(sum_copies(cot, gather.copies), vjp(cot)[0], rtol=1e-6)


def test_combine_scatter_is_the_map_collect_reads():
    # dropless aligned slots (padding rows): storing buffer row r at z[rows[r]] (rows outside
    # [0, N K) stored nowhere) writes every assignment row once and equals collect's rows;
    # the weighted sum of z's K rows per token equals combine (exact)
    rng = np.random.default_rng(6)
    n, k, groups, d = 9, 2, 4, 5
    experts = jnp.asarray(rng.integers(0, groups, n * k), jnp.int32)
    slot, _ = dropless_slots(experts, groups, 4)
    rows = padded_rows_bound(n * k, groups, 4)
    buf = jnp.asarray(rng.normal(size=(rows, d)), jnp.float32)
    weights = jnp.asarray(rng.random((n, k)), jnp.float32)
    scatter = combine_scatter(slot, weights, rows)
    target = np.asarray(scatter.rows)
    stored = target < n * k
    assert sorted(target[stored]) == list(range(n * k)) and not stored.all()
    z = np.zeros((n * k, d), np.float32)
    z[target[stored]] = np.asarray(buf)[stored]
    np.testing.assert_array_equal(z, collect(buf, slot))
    np.testing.assert_array_equal(
        combine(jnp.asarray(z), scatter.weights), combine(collect(buf, slot), weights)
    )
