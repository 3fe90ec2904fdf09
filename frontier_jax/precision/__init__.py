"""Numerical precision as a policy: which dtype each kind of computation runs in, and which
projections run as fp8 GEMMs (`recipe.py`)."""

from frontier_jax.precision.policy import PrecisionPolicy, get_policy, POLICIES
from frontier_jax.precision.recipe import Fp8Recipe, FP8_DEEPSEEK, FP8_TENSOR

__all__ = ["PrecisionPolicy", "get_policy", "POLICIES", "Fp8Recipe", "FP8_DEEPSEEK", "FP8_TENSOR"]
