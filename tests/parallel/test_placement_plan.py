"""The hot-expert planner (`parallel/placement.py`): packing and replication against brute force,
a case worked by hand, hierarchical against global placement, DeepSeek's EPLB worked example,
and the errors of bad input."""

import itertools

import numpy as np
import pytest

from frontier_jax.parallel.placement import (
    Placement,
    balanced_packing,
    device_load,
    imbalance,
    plan,
    replicate,
)


def _pack_maxima(weights: np.ndarray, packs: int) -> float:
    """The smallest possible heaviest pack over every split of `weights` into `packs` packs of
    equal size (brute force)."""
    per_pack = len(weights) // packs
    best = np.inf

    def split(rest: tuple, loads: list) -> None:
        nonlocal best
        if not rest:
            best = min(best, max(loads))
            return
        first = rest[0]  # the first remaining item opens the next pack: no pack order is counted twice
        for others in itertools.combinations(rest[1:], per_pack - 1):
            members = (first, *others)
            split(tuple(i for i in rest if i not in members), loads + [weights[list(members)].sum()])

    split(tuple(range(len(weights))), [])
    return best


def _packed_maximum(weights: np.ndarray, packs: int) -> float:
    pack, rank = balanced_packing(weights, packs)
    per_pack = len(weights) // packs
    assert np.bincount(pack, minlength=packs).tolist() == [per_pack] * packs
    assert sorted(zip(pack, rank)) == [(p, r) for p in range(packs) for r in range(per_pack)]
    return np.bincount(pack, weights, minlength=packs).max()


def test_packing_of_pairs_is_optimal():
    """Two items per pack: heaviest-first into the lightest open pack pairs the i-th heaviest with
    the i-th lightest, which is optimal; checked against brute force on random weights."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        weights = rng.integers(1, 100, 8).astype(float)
        assert _packed_maximum(weights, 4) == _pack_maxima(weights, 4)


def test_packing_of_triples_within_the_proven_bound():
    """Three items per pack: the same greedy is within 4/3 - 1/(3m) of the optimum (Kellerer &
    Woeginger 1993, "A tight bound for 3-partitioning"); brute force on random weights."""
    rng = np.random.default_rng(1)
    packs = 3
    ratios = []
    for _ in range(30):
        weights = rng.pareto(1.5, 9) + 0.1
        ratios.append(_packed_maximum(weights, packs) / _pack_maxima(weights, packs))
    assert max(ratios) <= 4 / 3 - 1 / (3 * packs) + 1e-12
    assert min(ratios) == pytest.approx(1.0)  # often optimal


def test_replication_minimises_the_hottest_copy():
    """Each extra copy to argmax load / copies minimises max_e load_e / copies_e over every way
    of giving R extra copies to E experts (brute force)."""
    rng = np.random.default_rng(2)
    experts, extra = 5, 4
    for _ in range(20):
        weights = rng.integers(0, 50, experts).astype(float)
        _, copies = replicate(weights, experts + extra)
        best = min(
            (weights / (1 + np.bincount(choice, minlength=experts))).max()
            for choice in itertools.combinations_with_replacement(range(experts), extra)
        )
        assert copies.sum() == experts + extra
        assert (weights / copies).max() == pytest.approx(best)


def test_golden_case_by_hand():
    """Load [12, 6, 3, 3], 2 replicas, 3 devices of 2 slots, one group (global):
    replication: 12/1 is the highest -> expert 0 gets a copy (6, 6, 3, 3 per copy); the tie 6 = 6
    goes to the lowest id -> expert 0 again: copies [3, 1, 1, 1], slots 0..5 hold [0, 1, 2, 3, 0, 0]
    with per-copy loads [4, 6, 3, 3, 4, 4].
    packing, heaviest first (ties by slot): 6 (expert 1) -> device 0; 4 (slot 0) -> device 1;
    4 (slot 4) -> device 2; 4 (slot 5) -> lightest open is device 1 (4 < 6, before device 2) -> full;
    3 (expert 2) -> device 2 (4 < 6) -> full; 3 (expert 3) -> device 0.
    Devices hold (1, 3), (0, 0), (0, 2): physical_to_logical [1, 3, 0, 0, 0, 2], loads [9, 8, 7]
    (the optimum: expert 1's 6 shares a device with at least a 3)."""
    load = np.array([[12.0, 6.0, 3.0, 3.0]])
    placement = plan(load, replicas=2, devices=3)
    assert placement.physical_to_logical.tolist() == [[1, 3, 0, 0, 0, 2]]
    assert placement.copies.tolist() == [[3, 1, 1, 1]]
    assert placement.logical_to_physical.tolist() == [[[2, 3, 4], [0, -1, -1], [5, -1, -1], [1, -1, -1]]]
    assert device_load(placement, load, 3).tolist() == [[9.0, 8.0, 7.0]]
    per_layer, overall = imbalance(device_load(placement, load, 3))
    assert per_layer.tolist() == [9 / 8] and overall == 9 / 8


def test_device_load_against_a_loop():
    rng = np.random.default_rng(3)
    load = rng.integers(0, 1000, (3, 16)).astype(float)
    placement = plan(load, replicas=8, devices=8, groups=4, nodes=2)
    expected = np.zeros((3, 8))
    for layer in range(3):
        for slot, expert in enumerate(placement.physical_to_logical[layer]):
            expected[layer, slot // 3] += load[layer, expert] / placement.copies[layer, expert]
    np.testing.assert_allclose(device_load(placement, load, 8), expected, rtol=1e-12)
    np.testing.assert_allclose(expected.sum(1), load.sum(1), rtol=1e-12)  # every token somewhere
    before = device_load(Placement.identity(3, 16), load, 8)
    np.testing.assert_array_equal(before, load.reshape(3, 8, 2).sum(-1))  # contiguous, no copies


def _group_nodes(placement: Placement, group_size: int, slots_per_node: int) -> list[set]:
    """For each layer and expert group, the set of nodes holding its experts' copies."""
    return [
        {slot // slots_per_node for slot, e in enumerate(row) if e // group_size == group}
        for row in placement.physical_to_logical
        for group in range(placement.num_experts // group_size)
    ]


def test_hierarchical_keeps_groups_on_nodes_global_balances_more():
    """Node-limited layout (16 experts in 4 groups, 2 nodes of 4 devices, 8 replicas) with one
    hot group: hierarchical placement keeps every group's experts and copies on one node (a token
    reaches at most topk_group nodes), paying imbalance for it (the hot group's node takes its
    load plus a group's); global placement spreads the hot copies over both nodes."""
    load = np.array([[400, 300, 200, 100] + [10] * 12], dtype=float)
    hierarchical = plan(load, replicas=8, devices=8, groups=4, nodes=2)
    global_ = plan(load, replicas=8, devices=8, groups=4, nodes=3)  # 3 does not divide 4: global
    assert np.array_equal(global_.physical_to_logical, plan(load, replicas=8, devices=8).physical_to_logical)
    assert all(len(nodes) == 1 for nodes in _group_nodes(hierarchical, 4, 12))
    assert len(_group_nodes(global_, 4, 12)[0]) == 2
    h, _ = imbalance(device_load(hierarchical, load, 8))
    g, _ = imbalance(device_load(global_, load, 8))
    node_totals = device_load(hierarchical, load, 8).reshape(2, 4).sum(1)
    assert sorted(node_totals.tolist()) == [40 + 40, 1000 + 40]  # hot group + a cold one per node
    assert h[0] >= (1040 / 4) / (1120 / 8)  # the hot node's 4 devices share 1040 at best evenly
    assert g[0] < 0.7 * h[0]


# DeepSeek EPLB's README example: 2 layers of 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs,
# and the placement its README prints for it (github.com/deepseek-ai/EPLB).
EPLB_LOAD = np.array(
    [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ],
    dtype=float,
)
EPLB_PHYSICAL_TO_LOGICAL = [
    [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
]


def test_eplb_readme_example():
    """Per-layer max/mean per-device load within 1.01x of EPLB's published placement on the same
    loads (its device loads computed here from its printed physical_to_logical)."""
    eplb = Placement.from_physical(np.array(EPLB_PHYSICAL_TO_LOGICAL), 12)
    ours = plan(EPLB_LOAD, replicas=4, devices=8, groups=4, nodes=2)
    theirs, _ = imbalance(device_load(eplb, EPLB_LOAD, 8))
    mine, _ = imbalance(device_load(ours, EPLB_LOAD, 8))
    assert (mine <= 1.01 * theirs).all(), (mine, theirs)
    np.testing.assert_allclose(theirs, [156 / (1033 / 8), 1.2422145], rtol=1e-6)  # worked: 90 + 132/2
    before, _ = imbalance(device_load(Placement.identity(2, 12), EPLB_LOAD, 4))
    assert (mine < before).all()


@pytest.mark.parametrize(
    "load_shape,kwargs,message",
    [
        ((2, 12), {"replicas": 3, "devices": 8}, "15 slots do not split over 8 devices"),
        ((12,), {"replicas": 4, "devices": 8}, "must be \\[layers, experts\\], got shape \\(12,\\)"),
        ((2, 12), {"replicas": -4, "devices": 2}, "replicas -4: must be >= 0"),
        ((2, 12), {"replicas": 4, "devices": 0}, "devices 0: must be >= 1"),
        ((2, 12), {"replicas": 4, "devices": 8, "groups": 5}, "12 experts do not split into 5 groups"),
        ((2, 12), {"replicas": 0, "devices": 6, "groups": 4, "nodes": 4}, "6 devices do not split over 4"),
    ],
)
def test_bad_input_is_one_error_line(load_shape, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        plan(np.ones(load_shape), **kwargs)
    assert "\n" not in str(err.value)


def test_device_load_of_another_model_is_one_error_line():
    placement = plan(EPLB_LOAD, replicas=4, devices=8)
    with pytest.raises(ValueError, match="for 2 MoE layers x 12 experts, the model has 3 x 12") as err:
        device_load(placement, np.ones((3, 12)), 8)
    assert "\n" not in str(err.value)
