"""Numerical precision as a policy: which dtype each kind of computation runs in, and which
projections run as fp8 GEMMs (`recipe.py`)."""

from frontier_jax.precision.policy import POLICIES, PrecisionPolicy, get_policy
from frontier_jax.precision.recipe import FP8_DEEPSEEK, FP8_TENSOR, Fp8Recipe

__all__ = ["PrecisionPolicy", "get_policy", "POLICIES", "Fp8Recipe", "FP8_DEEPSEEK", "FP8_TENSOR"]
