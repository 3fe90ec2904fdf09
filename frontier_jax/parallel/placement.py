"""Expert placement: which logical expert each physical expert slot holds, per MoE layer.

With E logical experts, R redundant slots and D devices on the `expert` axis, each layer has
S = E + R physical slots; slot s lives on device s // (S / D).  A placement is three arrays:

  physical_to_logical [L, S]      logical expert held by slot s (every expert at least once)
  logical_to_physical [L, E, R+1] the slots holding copies of expert e, padded with -1 (a fixed
                                  width, so a new plan changes values, not shapes)
  copies              [L, E]      number of slots holding expert e (sum over e = S)

The identity placement (R = 0, slot s holds expert s) is what the model runs without one.
`plan` computes a placement from measured expert loads (DeepSeek's EPLB policy: replicate the
experts with the highest load per copy, pack the copies so that devices carry equal load,
expert groups kept on one node when node-limited routing applies); `device_load` and
`imbalance` measure a placement (max / mean per-device load).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np


@dataclasses.dataclass(frozen=True)
class Placement:
    """Physical expert slots of every MoE layer (see the module docstring for the shapes)."""

    physical_to_logical: np.ndarray
    logical_to_physical: np.ndarray
    copies: np.ndarray

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def num_experts(self) -> int:
        return self.copies.shape[1]

    @property
    def replicas(self) -> int:
        return self.num_slots - self.num_experts

    @classmethod
    def from_physical(cls, physical_to_logical: np.ndarray, num_experts: int) -> Placement:
        """The placement whose slots hold `physical_to_logical` [L, S] (logical ids in [0, E))."""
        p2l = np.asarray(physical_to_logical, dtype=np.int32)
        if p2l.ndim != 2:
            raise ValueError(f"physical_to_logical must be [layers, slots], got shape {p2l.shape}")
        layers, slots = p2l.shape
        if slots < num_experts or p2l.min(initial=0) < 0 or p2l.max(initial=0) >= num_experts:
            raise ValueError(
                f"physical_to_logical must hold expert ids in [0, {num_experts}) in at least "
                f"{num_experts} slots, got shape {p2l.shape} with ids {p2l.min()}..{p2l.max()}"
            )
        width = slots - num_experts + 1
        l2p = np.full((layers, num_experts, width), -1, np.int32)
        copies = np.zeros((layers, num_experts), np.int32)
        for layer in range(layers):
            for slot, expert in enumerate(p2l[layer]):
                l2p[layer, expert, copies[layer, expert]] = slot
                copies[layer, expert] += 1
        missing = np.argwhere(copies == 0)
        if len(missing):
            layer, expert = missing[0]
            raise ValueError(f"layer {layer}: expert {expert} has no slot (every expert needs one)")
        return cls(p2l, l2p, copies)

    @classmethod
    def identity(cls, num_layers: int, num_experts: int) -> Placement:
        """No redundant experts: slot s holds expert s in every layer."""
        return cls.from_physical(np.tile(np.arange(num_experts), (num_layers, 1)), num_experts)

    def check_fits(self, num_layers: int, num_experts: int, devices: int) -> None:
        """ValueError naming the mismatch when this placement is not one of a model with
        `num_layers` MoE layers and `num_experts` routed experts over `devices` expert devices."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise ValueError(
                f"the placement is for {self.num_layers} MoE layers x {self.num_experts} experts, the "
                f"model has {num_layers} x {num_experts}: plan it from this model's expert load"
            )
        if self.num_slots % devices:
            raise ValueError(
                f"the placement's {self.num_slots} slots ({self.num_experts} experts + {self.replicas} "
                f"replicas) do not split over {devices} expert devices: plan with replicas such that "
                f"experts + replicas is a multiple of {devices}"
            )

    def to_json(self) -> dict:
        return {
            "physical_to_logical": self.physical_to_logical.tolist(),
            "logical_to_physical": self.logical_to_physical.tolist(),
            "copies": self.copies.tolist(),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Placement:
        """The placement in a plan file (`frontier-jax experts plan --out`); `physical_to_logical`
        is the source of truth, the other arrays are recomputed and must agree with it."""
        try:
            data = json.loads(Path(path).read_text())
            p2l = np.asarray(data["physical_to_logical"], dtype=np.int32)
            copies = np.asarray(data["copies"], dtype=np.int32)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a placement file ({type(err).__name__}: {err})") from None
        placement = cls.from_physical(p2l, copies.shape[-1] if copies.ndim == 2 else -1)
        if not np.array_equal(placement.copies, copies):
            raise ValueError(f"{path}: 'copies' disagrees with 'physical_to_logical'")
        return placement


# ----------------------------------------------------------------------------- planning
def balanced_packing(weights: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of n weighted items into `packs` packs of exactly n / packs items each:
    items in order of decreasing weight, each into the lightest pack that is not full (ties: the
    lowest pack).  weights [n] -> (pack of each item [n], its rank within that pack [n]).

    The heaviest pack weighs at most (sum w) / packs + max w (Graham's list-scheduling bound:
    the pack that receives the last item was the lightest open one)."""
    items = len(weights)
    per_pack = items // packs
    pack_load = np.zeros(packs)
    pack_size = np.zeros(packs, np.int64)
    pack = np.empty(items, np.int64)
    rank = np.empty(items, np.int64)
    for item in np.argsort(-np.asarray(weights, np.float64), kind="stable"):
        open_packs = np.flatnonzero(pack_size < per_pack)
        chosen = open_packs[np.argmin(pack_load[open_packs])]
        pack[item], rank[item] = chosen, pack_size[chosen]
        pack_load[chosen] += weights[item]
        pack_size[chosen] += 1
    return pack, rank


def replicate(weights: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """n experts onto `slots` >= n slots: slot i < n holds expert i, each further slot a copy of
    the expert with the highest load per copy, argmax_e w_e / c_e (ties: the lowest e).
    weights [n] -> (expert of each slot [slots], copies of each expert [n])."""
    copies = np.ones(len(weights), np.int64)
    expert_of_slot = list(range(len(weights)))
    for _ in range(slots - len(weights)):
        hottest = int(np.argmax(np.asarray(weights, np.float64) / copies))
        expert_of_slot.append(hottest)
        copies[hottest] += 1
    return np.asarray(expert_of_slot, np.int64), copies


def _plan_layer(load: np.ndarray, slots: int, devices: int, groups: int, nodes: int) -> np.ndarray:
    """One layer's physical_to_logical [slots] (`plan`'s docstring)."""
    experts = len(load)
    group_size = experts // groups
    # 1. whole expert groups onto nodes, balancing the nodes' loads
    group_node, group_rank = balanced_packing(load.reshape(groups, group_size).sum(1), nodes)
    node_experts = np.empty((nodes, experts // nodes), np.int64)  # logical ids, node-local order
    for group in range(groups):
        start = group_rank[group] * group_size
        node_experts[group_node[group], start : start + group_size] = (
            np.arange(group_size) + group * group_size
        )
    slots_per_node, devices_per_node = slots // nodes, devices // nodes
    slots_per_device = slots // devices
    physical_to_logical = np.empty(slots, np.int64)
    for node in range(nodes):
        local = node_experts[node]
        # 2. the node's slots to its experts' copies
        local_of_slot, copies = replicate(load[local], slots_per_node)
        per_copy = load[local][local_of_slot] / copies[local_of_slot]
        # 3. the copies onto the node's devices
        device, rank = balanced_packing(per_copy, devices_per_node)
        physical = node * slots_per_node + device * slots_per_device + rank
        physical_to_logical[physical] = local[local_of_slot]
    return physical_to_logical


def _check_plan_args(load: np.ndarray, replicas: int, devices: int, groups: int, nodes: int) -> None:
    if load.ndim != 2 or load.shape[1] == 0:
        raise ValueError(f"expert load must be [layers, experts], got shape {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("expert load must be finite and >= 0 (token counts per expert)")
    experts = load.shape[1]
    for name, value in (("devices", devices), ("groups", groups), ("nodes", nodes)):
        if value < 1:
            raise ValueError(f"{name} {value}: must be >= 1")
    if replicas < 0:
        raise ValueError(f"replicas {replicas}: must be >= 0")
    if (experts + replicas) % devices:
        raise ValueError(
            f"{experts} experts + {replicas} replicas = {experts + replicas} slots do not split over "
            f"{devices} devices: use replicas with experts + replicas a multiple of devices"
        )
    if experts % groups:
        raise ValueError(f"{experts} experts do not split into {groups} groups: groups must divide experts")


def is_hierarchical(groups: int, nodes: int) -> bool:
    """Whether `plan` places expert groups onto nodes first: when the nodes divide the groups
    (EPLB's rule; with one node, the groups' order only breaks ties)."""
    return groups % nodes == 0


def plan(load: np.ndarray, *, replicas: int, devices: int, groups: int = 1, nodes: int = 1) -> Placement:
    """The placement of E logical experts on S = E + R slots over D devices that balances
    `load` [L, E] (tokens per expert, e.g. a ledger window), per layer (DeepSeek's EPLB policy):

      1. groups onto nodes: the G expert groups (contiguous ids) are packed onto the N nodes,
         G / N groups each, balancing the nodes' summed loads (`balanced_packing`);
      2. replicas within a node: the node's S / N slots go to its E / N experts, each extra one
         to the expert with the highest load per copy (`replicate`);
      3. copies onto devices: the node's copies, each weighing load / copies, are packed onto
         its D / N devices, S / D slots each (`balanced_packing`).

    Hierarchical (steps 1-3 as written) when N divides G, so that a token routed to its top
    groups (group-limited routing) reaches few nodes; global otherwise: the same with one group
    and one node.  Slot s is on device s // (S / D), device d on node d // (D / N)."""
    load = np.asarray(load, np.float64)
    _check_plan_args(load, replicas, devices, groups, nodes)
    experts = load.shape[1]
    slots = experts + replicas
    if not is_hierarchical(groups, nodes):
        groups = nodes = 1
    elif devices % nodes:
        raise ValueError(
            f"{devices} devices do not split over {nodes} nodes: nodes must divide devices for "
            f"hierarchical placement ({groups} groups over {nodes} nodes)"
        )
    return Placement.from_physical(
        np.stack([_plan_layer(row, slots, devices, groups, nodes) for row in load]), experts
    )


def device_load(placement: Placement, load: np.ndarray, devices: int) -> np.ndarray:
    """Per-device load [L, D] of `placement` running `load` [L, E], each expert's load split
    evenly over its copies: device d sums load[l, p2l[l, s]] / copies[l, p2l[l, s]] over its
    slots s in [d S/D, (d+1) S/D)."""
    load = np.asarray(load, np.float64)
    placement.check_fits(*load.shape, devices)
    rows = np.arange(placement.num_layers)[:, None]
    experts = placement.physical_to_logical
    per_slot = load[rows, experts] / placement.copies[rows, experts]
    return per_slot.reshape(placement.num_layers, devices, -1).sum(-1)


def imbalance(per_device: np.ndarray) -> tuple[np.ndarray, float]:
    """max / mean per-device load: per layer [L] (1 = balanced; 1 for a layer without load) and
    overall, sum_l max_l / sum_l mean_l (a forward waits for each layer's busiest device)."""
    peak, mean = per_device.max(-1), per_device.mean(-1)
    per_layer = np.where(mean > 0, peak / np.where(mean > 0, mean, 1.0), 1.0)
    overall = float(peak.sum() / mean.sum()) if mean.sum() > 0 else 1.0
    return per_layer, overall
