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

Gathered and combined rows (`impl.gmm_gather`): the dispatch's row gather lhs[r] = x[rows[r]]
either runs as an XLA gather that writes the sorted [M, K] copy ("xla"), or inside the Pallas
kernel's loads ("dispatch", "fused": `grouped_matmul(x, ..., gather=RowGather(rows, copies))`);
the combine out[t] = sum_p w[t, p] z[t P + p] of the product rows z[rows[r]] = (lhs rhs)[r]
either runs after an XLA collect gather of z, or inside the kernel's stores and backward loads
("fused": `grouped_matmul(..., combine=RowCombine(rows, weights))`).  Both only where the Pallas
bf16 kernel runs (`fuses_gather` says where).
"""

from __future__ import annotations

import enum
from typing import NamedTuple

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


class GmmGather(enum.StrEnum):
    xla = "xla"  # XLA gathers move the rows into the sorted buffer and back into token order
    dispatch = "dispatch"  # the Pallas gate/up kernel gathers the token rows in its loads
    fused = "fused"  # that, and the down kernel stores its rows in token order for the combine


class RowGather(NamedTuple):
    """A row gather lhs[r] = x[rows[r]] and its inverse, for x [S, K] and lhs [M, K]."""

    rows: jax.Array  # [M] int: source row of each lhs row (outside [0, S): a zero row)
    copies: jax.Array  # [S, C] int: the lhs rows reading each source row (M: none)


class RowCombine(NamedTuple):
    """A weighted row combine out[t] = sum_p weights[t, p] z[t P + p] of the product rows,
    z[rows[r]] = out_sorted[r] (a one-to-one map onto [0, T P))."""

    rows: jax.Array  # [M] int: the z row of each product row (outside [0, T P): none)
    weights: jax.Array  # [T, P]: the weight of each z row in its output row


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


def fuses_gather(impl: str, policy: PrecisionPolicy | None = None) -> bool:
    """Whether `grouped_matmul` can take a RowGather or a RowCombine (the Pallas bf16 kernel runs
    the experts)."""
    return resolve_impl(impl) == "pallas" and not fp8_experts(policy)


def grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str,
    dtype=jnp.bfloat16,
    policy: PrecisionPolicy | None = None,
    layer: str = "moe.experts",
    gather: RowGather | None = None,
    combine: RowCombine | None = None,
) -> jax.Array:
    """out[r] = lhs[r] @ rhs[g(r)] [M, N] in `dtype` (module docstring); given `gather`, lhs is
    the source x [S, K] and out[r] = x[gather.rows[r]] @ rhs[g(r)]; given `combine`, the result
    is the combine of those rows, [T, N] in fp32 (both only where `fuses_gather(impl, policy)`)."""
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    fp8 = None if policy is None else policy.grouped_matmul(layer)
    impl = resolve_impl(impl)
    if gather is not None or combine is not None:
        if fp8 is not None or impl != "pallas":
            raise ValueError(
                f"grouped_matmul: a fused row gather or combine needs the Pallas bf16 kernel, not "
                f"impl.gmm={impl!r}{' with fp8 ' + layer if fp8 is not None else ''}; move the rows "
                "with expert_compute.dispatch / collect instead"
            )
        gathered = {} if gather is None else dict(lhs_rows=gather.rows, lhs_copies=gather.copies)
        combined = {} if combine is None else dict(out_rows=combine.rows, out_weights=combine.weights)
        out = tiled_grouped_matmul(lhs, rhs, group_sizes, **gathered, **combined)
        return out if combine is not None else out.astype(dtype)
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
