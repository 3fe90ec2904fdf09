"""Expert placement: which logical expert each physical expert slot holds, per MoE layer.

With E logical experts, R redundant slots and D devices on the `expert` axis, each layer has
S = E + R physical slots; slot s lives on device s // (S / D).  A placement is three arrays:

  physical_to_logical [L, S]      logical expert held by slot s (every expert at least once)
  logical_to_physical [L, E, R+1] the slots holding copies of expert e, padded with -1 (a fixed
                                  width, so a new plan changes values, not shapes)
  copies              [L, E]      number of slots holding expert e (sum over e = S)

The identity placement (R = 0, slot s holds expert s) is what the model runs without one.
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
