"""Grouped matrix multiply: one interface, several kernels (`impl.gmm`).

Rows of lhs [M, K] are laid out group by group; group g owns rows [o_g, o_g + n_g) with
n = group_sizes [G] and o_g = sum_{h<g} n_h (sum(n) <= M; rows past the sum produce zeros).
The result is
    out[r] = lhs[r] @ rhs[g(r)]          rhs [G, K, N] -> out [M, N]
computed in `dtype` with fp32 accumulation.

  * "pallas":     our Pallas grouped GEMM (`frontier_jax.kernels.grouped_gemm`): forward, input
    gradient and per-expert weight gradient as Triton kernels on GPUs (the Pallas interpreter
    elsewhere, slow).  Needs every n_g and M to be multiples of its row tile: the dispatch pads
    groups to `row_alignment(...)` rows.
  * "ragged_dot": `jax.lax.ragged_dot`, the exact reference (on GPU images XLA lowers it to
    padded dense matmuls: correct but slow and memory hungry).
  * "tokamax":    `tokamax.ragged_dot` (Pallas Mosaic-GPU kernel; XLA fallback elsewhere).
    Needs the optional `gpu` extra (Python >= 3.12).  Its weight gradient is inaccurate on
    the H100 as of tokamax 0.0.17 (benchmarks/RESULTS.md): not for training.
  * "auto":       "pallas" on GPUs, "ragged_dot" elsewhere.

When a precision `policy` runs the expert matmul `layer` in fp8 (`PrecisionPolicy.grouped_matmul`),
its fp8 grouped matmul replaces the kernel chosen by `impl` (all three GEMMs in fp8).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from frontier_jax.kernels.grouped_gemm import TILE_ROWS, tiled_grouped_matmul
from frontier_jax.ops.tokamax_import import tokamax
from frontier_jax.precision import PrecisionPolicy


class GmmImpl(enum.StrEnum):
    auto = "auto"
    pallas = "pallas"
    ragged_dot = "ragged_dot"
    tokamax = "tokamax"


def resolve_impl(impl: str) -> str:
    """`impl.gmm` with "auto" replaced by the kernel for the default backend."""
    if impl not in set(GmmImpl):
        raise ValueError(f"impl.gmm={impl!r} is unknown; allowed: {', '.join(GmmImpl)}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "ragged_dot"
    return impl


EXPERT_LAYERS = ("moe.experts.w_gate", "moe.experts.w_up", "moe.experts.w_down")


def fp8_experts(policy: PrecisionPolicy | None) -> bool:
    """Whether the policy runs any routed-expert matmul in fp8."""
    return policy is not None and any(policy.grouped_matmul(layer) is not None for layer in EXPERT_LAYERS)


def row_alignment(impl: str, policy: PrecisionPolicy | None = None) -> int:
    """Rows every group must be padded to for `impl` (1: none); fp8 expert GEMMs take the
    same tile-aligned layout."""
    return TILE_ROWS if fp8_experts(policy) or resolve_impl(impl) == "pallas" else 1


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str,
    dtype=jnp.bfloat16,
    policy: PrecisionPolicy | None = None,
    layer: str = "moe.experts",
) -> jax.Array:
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    fp8 = None if policy is None else policy.grouped_matmul(layer)
    impl = resolve_impl(impl)
    if fp8 is not None:
        out = fp8(lhs, rhs, group_sizes)
    elif impl == "pallas":
        out = tiled_grouped_matmul(lhs, rhs, group_sizes)
    elif impl == "ragged_dot":
        out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    else:
        # fp32 accumulation inside the kernel; its backward kernels need operands of one dtype,
        # so the output (hence the incoming cotangent) stays in `dtype`.
        out = tokamax("impl.gmm").ragged_dot(lhs, rhs, group_sizes, preferred_element_type=dtype)
    return out.astype(dtype)
