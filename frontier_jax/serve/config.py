"""Typed configuration of the server (the run config's `serve` section)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeConfig:
    """max_waiting: requests queued for a decode slot (submitted, not admitted) beyond which a
    new one is answered 503 with Retry-After; drain_timeout_s: on SIGTERM, seconds that running
    requests get to finish before they are cancelled; retry_after_s: the Retry-After of a 503;
    follower_timeout_s: on a multi-process mesh, seconds a step (first compilations included)
    may take on all processes before process 0 takes a follower for failed and exits."""

    max_waiting: int = 256
    drain_timeout_s: float = 30.0
    retry_after_s: int = 1
    follower_timeout_s: float = 600.0

    def validate(self) -> "ServeConfig":
        if not isinstance(self.max_waiting, int) or self.max_waiting < 0:
            raise ValueError(f"serve.max_waiting={self.max_waiting!r} must be an integer >= 0")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"serve.drain_timeout_s={self.drain_timeout_s!r} must be >= 0")
        if not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            raise ValueError(f"serve.retry_after_s={self.retry_after_s!r} must be an integer >= 0")
        if not self.follower_timeout_s > 0:
            raise ValueError(f"serve.follower_timeout_s={self.follower_timeout_s!r} must be > 0")
        return self
