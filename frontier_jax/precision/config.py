"""The `precision:` section of the run configuration: the named precision policy."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from frontier_jax.precision.policy import POLICIES

# The registered policies' names (`policy.POLICIES`), so OmegaConf rejects any other on load.
PolicyName = enum.StrEnum("PolicyName", {name: name for name in POLICIES})


@dataclass
class PrecisionConfig:
    policy: PolicyName = PolicyName("fp32")

    def validate(self) -> "PrecisionConfig":
        return self
