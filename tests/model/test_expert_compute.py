"""The row-moving primitives of expert dispatch: values and gradients equal plain indexing."""

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model.expert_compute import (
    capacity_slots, from_slots, gather_assignments, invert, move_rows, sort_assignments, to_slots)


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


def test_slot_round_trip_and_assignment_gradient():
    rng = np.random.default_rng(1)
    n, k, groups, capacity = 6, 2, 3, 3
    experts = jnp.asarray(rng.integers(0, groups, (n * k,)), jnp.int32)
    order, inverse = sort_assignments(experts)
    x = jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)
    slot, keep = capacity_slots(experts[order], groups, capacity)

    def through_slots(x):
        rows = gather_assignments(x, order, inverse, k)
        return from_slots(to_slots(rows, slot, groups * capacity), slot)

    expected = np.asarray(x)[np.asarray(order) // k] * np.asarray(keep)[:, None]
    np.testing.assert_array_equal(through_slots(x), expected)
    cot = jnp.asarray(rng.normal(size=(n * k, 4)), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(through_slots(x) * cot))(x)
    naive = np.zeros((n, 4))
    for a in range(n * k):
        if keep[a]:
            naive[int(order[a]) // k] += np.asarray(cot[a])
    np.testing.assert_allclose(grad, naive, rtol=1e-6)
