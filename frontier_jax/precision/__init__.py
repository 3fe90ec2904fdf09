"""Numerical precision as a policy: which dtype each kind of computation runs in."""

from frontier_jax.precision.policy import PrecisionPolicy, get_policy, POLICIES

__all__ = ["PrecisionPolicy", "get_policy", "POLICIES"]
