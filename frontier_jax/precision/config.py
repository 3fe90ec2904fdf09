"""The `precision:` section of the run configuration: the named precision policy."""

from __future__ import annotations

from dataclasses import dataclass

from frontier_jax.precision.policy import POLICIES


@dataclass
class PrecisionConfig:
    policy: str = "fp32"

    def validate(self) -> "PrecisionConfig":
        if self.policy not in POLICIES:
            raise ValueError(f"precision.policy={self.policy!r}: allowed values are {', '.join(POLICIES)}")
        return self
