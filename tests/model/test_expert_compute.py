"""The row-moving primitives of expert dispatch: values and gradients equal plain indexing,
and the buffer layouts equal naive loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.kernels.grouped_gemm import padded_rows_bound
from frontier_jax.model.expert_compute import (
    capacity_slots, collect, combine, dispatch, dropless_slots, invert, move_rows)


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


def test_dispatch_collect_combine_values_and_gradient():
    rng = np.random.default_rng(1)
    n, k, groups, capacity = 6, 2, 3, 3
    experts = jnp.asarray(rng.integers(0, groups, (n * k,)), jnp.int32)
    x = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
    gates = jnp.asarray(rng.uniform(size=(n, k)), jnp.float32)
    slot, keep = capacity_slots(experts, groups, capacity)

    def through_buffer(x):
        buf = dispatch(x, slot, groups * capacity) * 2.0
        return combine(collect(buf, slot), gates)

    keep_np, x_np, g_np = np.asarray(keep).reshape(n, k), np.asarray(x), np.asarray(gates)
    expected = 2.0 * np.einsum("nk,nd->nd", g_np * keep_np, x_np)
    np.testing.assert_allclose(through_buffer(x), expected, rtol=1e-6)
    cot = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(through_buffer(x) * cot))(x)
    np.testing.assert_allclose(grad, 2.0 * (g_np * keep_np).sum(1)[:, None] * np.asarray(cot),
                               rtol=1e-6)
    buf = np.asarray(dispatch(x, slot, groups * capacity))
    used = np.zeros(groups * capacity, bool)
    used[np.asarray(slot)[np.asarray(keep)]] = True
    assert not buf[~used].any()  # unused rows are zero
