"""Grouped matrix multiply: one interface, several kernels (`model.gmm_impl`).

Rows of lhs [M, K] are sorted by group; group g owns rows [o_g, o_g + n_g) with
n = group_sizes [G] (sum(n) <= M; rows past the sum produce zeros).  The result is
    out[r] = lhs[r] @ rhs[g(r)]          rhs [G, K, N] -> out [M, N]
computed in `dtype` with fp32 accumulation.

  * "ragged_dot": `jax.lax.ragged_dot`, the exact reference (on GPU images XLA lowers it to
    padded dense matmuls: correct but slow and memory hungry).
  * "tokamax":    `tokamax.ragged_dot` (Pallas Mosaic-GPU kernel; XLA fallback elsewhere).
    Needs the optional `gpu` extra (Python >= 3.12).

When a precision `policy` runs the expert matmul `layer` in fp8 (`PrecisionPolicy.grouped_matmul`),
its fp8 grouped matmul replaces the kernel chosen by `impl` (all three GEMMs in fp8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from frontier_jax.model.tokamax_import import tokamax
from frontier_jax.precision import PrecisionPolicy


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, impl: str,
                   dtype=jnp.bfloat16, policy: PrecisionPolicy | None = None,
                   layer: str = "moe.experts") -> jax.Array:
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    fp8 = None if policy is None else policy.grouped_matmul(layer)
    if fp8 is not None:
        out = fp8(lhs, rhs, group_sizes)
    elif impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    elif impl == "tokamax":
        # fp32 accumulation inside the kernel; its backward kernels need operands of one dtype,
        # so the output (hence the incoming cotangent) stays in `dtype`.
        out = tokamax("model.gmm_impl").ragged_dot(lhs, rhs, group_sizes, preferred_element_type=dtype)
    else:
        raise ValueError(f"model.gmm_impl={impl!r} is unknown; allowed: ragged_dot, tokamax")
    return out.astype(dtype)
