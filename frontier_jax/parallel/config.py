"""The `mesh:` section of the run configuration: device mesh axis sizes and the rules table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from frontier_jax.parallel.rules import RULE_SETS

# The rules tables' names (`rules.RULE_SETS`), so OmegaConf rejects any other on load.
RuleSetName = enum.StrEnum("RuleSetName", {name: name for name in RULE_SETS})


@dataclass
class MeshAxes:
    """A size per mesh axis."""

    stage: int = 1
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclass
class MeshConfig:
    """Device mesh axis sizes (their product must equal the device count).

    `dcn` gives, per axis, the factor of its size that spans slices / hosts over the slow
    data-centre network (DCN); the rest of each axis lies within a slice or node (ICI /
    NVLink).  `rules` names the logical-axis -> mesh-axis table (`frontier_jax.parallel.rules`).
    `stage` > 1 runs pipeline stages, which needs `train.pipeline.schedule` (checked with the
    model by `parallel.pipeline.plan.pipeline_plan`).
    """

    stage: int = 1
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn: MeshAxes = field(default_factory=MeshAxes)
    rules: RuleSetName = RuleSetName("default")

    def validate(self) -> "MeshConfig":
        for name in ("stage", "fsdp", "expert", "tensor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mesh.{name}={getattr(self, name)} must be > 0")
        if self.data == 0 or self.data < -1:
            raise ValueError(f"mesh.data={self.data} must be > 0 or -1 (use the remaining devices)")
        for name in ("stage", "data", "fsdp", "expert", "tensor"):
            factor, size = getattr(self.dcn, name), getattr(self, name)
            if factor <= 0:
                raise ValueError(f"mesh.dcn.{name}={factor} must be > 0")
            if size != -1 and size % factor:
                raise ValueError(f"mesh.dcn.{name}={factor} must divide mesh.{name}={size}")
        return self
