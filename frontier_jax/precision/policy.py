"""Precision policies.

A `PrecisionPolicy` decides, for every projection of the model, the dot-general that runs it
(the hook through which fp8 recipes plug in) and the dtype activations are computed in.
Master weights always stay in `param_dtype` (fp32); norms, router, softmax and the loss run
in fp32 regardless of the policy.  Changing the recipe is a config change, never a model edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp

DotGeneral = Callable[..., jax.Array]


def _dot_general_accumulate_fp32(lhs, rhs, dimension_numbers, precision=None,
                                 preferred_element_type=None):
    """`lax.dot_general` on operands in the compute dtype, accumulated in fp32 and returned in
    the operands' dtype (what cuBLAS does for bf16 GEMMs)."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(preferred_element_type or lhs.dtype)


@dataclass(frozen=True)
class PrecisionPolicy:
    """name: registry key; compute_dtype: dtype of activations and projection operands;
    param_dtype: master-weight dtype."""

    name: str
    compute_dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32

    def dot_general(self, layer: str) -> DotGeneral:
        """The dot-general used by the projection called `layer` (e.g. "mla.wq_b")."""
        del layer  # every projection is treated alike by the bf16/fp32 policies
        if self.compute_dtype == jnp.float32:
            return jax.lax.dot_general
        return _dot_general_accumulate_fp32


POLICIES = {
    "fp32": PrecisionPolicy("fp32", jnp.float32),
    "bf16": PrecisionPolicy("bf16", jnp.bfloat16),
}


def get_policy(name: str) -> PrecisionPolicy:
    if name not in POLICIES:
        raise ValueError(
            f"precision.policy={name!r} is not a known policy; allowed values are "
            f"{', '.join(POLICIES)}")
    return POLICIES[name]
