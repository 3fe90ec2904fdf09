"""Basic layers: parameters with logical axis names, projections through the precision policy,
RMSNorm and the token embedding."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.precision import PrecisionPolicy
from frontier_jax.precision.mixed import einsum_fp32


def normal_param(
    rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float, dtype=jnp.float32
) -> nnx.Param:
    """A trainable weight ~ N(0, std^2) whose dimensions carry the logical names `axes`."""
    if len(shape) != len(axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
    value = std * jax.random.normal(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x W without bias, W of shape in_shape + out_shape.

    Contracts the last len(in_shape) dimensions of x with the first len(in_shape) of W:
    x [..., *in_shape] -> y [..., *out_shape].  The dot-general comes from the precision
    policy (keyed by `name`), so fp8 recipes replace it without touching model code.
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Sequence[str],
        *,
        name: str,
        std: float,
        policy: PrecisionPolicy,
        rngs: nnx.Rngs,
    ):
        self.in_rank = len(in_shape)
        self.name = name
        self.policy = policy
        self.kernel = normal_param(rngs, (*in_shape, *out_shape), axes, std, policy.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return _project(x, self.kernel[...], self.in_rank, self.policy, self.name)


def _project(x: jax.Array, kernel: jax.Array, in_rank: int, policy: PrecisionPolicy, layer: str) -> jax.Array:
    """x [..., *in] . kernel [*in, *out] -> [..., *out] through the policy's dot-general of
    `layer`, both operands in the compute dtype."""
    dtype = policy.compute_dtype
    x_dims = tuple(range(x.ndim - in_rank, x.ndim))
    dot = policy.dot_general(layer)
    return dot(x.astype(dtype), kernel.astype(dtype), ((x_dims, tuple(range(in_rank))), ((), ())))


def project_jointly(x: jax.Array, linears: Sequence[Linear]) -> list[jax.Array]:
    """[x W_1, ..., x W_n] for `Linear` layers that read the same x, as one projection
    x [W_1 | ... | W_n]: one pass over x and one larger GEMM (one quantization of x under fp8
    policies) instead of n.  Output columns are independent, so each result is the layer's own.

    Kernels of equal shape [*in, *out] are stacked on a new axis before the last output dim
    ([*in, *out[:-1], n, out[-1]]: a sharded last dim stays whole per layer); otherwise they
    must agree but in the last output dim and are concatenated along it.  Layers whose
    precision differs (one in fp8, another not) run one by one.  The joint layer is named
    "a+b+..." (its fp8 decision: all parts', `PrecisionPolicy.uses_fp8`).

    Joining pays only for many rows: the joint kernel is a copy of the n kernels (written and
    read again: 2 |W| more bytes, |W| = in x sum of the outputs), against (n - 1) passes over x
    saved (rows x in each).  So the layers run one by one unless rows (n - 1) >= 2 sum(out)
    (`joining_pays`): training and prefill chunks join, decode steps of a few rows do not."""
    first = linears[0]
    kernels = [lin.kernel[...] for lin in linears]
    names = [lin.name for lin in linears]
    alike = (
        all(lin.policy is first.policy and lin.in_rank == first.in_rank for lin in linears)
        and len({first.policy.uses_fp8(name) for name in names}) == 1
        and len({k.shape[:-1] for k in kernels}) == 1
    )
    if not alike or not joining_pays(x, kernels, first.in_rank):
        return [lin(x) for lin in linears]
    stacked = len({k.shape for k in kernels}) == 1
    kernel = jnp.stack(kernels, axis=-2) if stacked else jnp.concatenate(kernels, axis=-1)
    y = _project(x, kernel, first.in_rank, first.policy, "+".join(names))
    if stacked:
        return [y[..., i, :] for i in range(len(linears))]
    ends = np.cumsum([k.shape[-1] for k in kernels])[:-1]
    return jnp.split(y, ends, axis=-1)


def joining_pays(x: jax.Array, kernels: Sequence[jax.Array], in_rank: int) -> bool:
    """Whether one projection of x [..., *in] through the n kernels [*in, *out_i] joined reads
    fewer bytes than n projections (`project_jointly`): rows (n - 1) >= 2 sum_i |out_i|."""
    rows = math.prod(x.shape[: x.ndim - in_rank])
    outputs = sum(math.prod(k.shape[in_rank:]) for k in kernels)
    return rows * (len(kernels) - 1) >= 2 * outputs


class RMSNorm(nnx.Module):
    """RMSNorm(x) = w * x / sqrt(mean(x^2) + eps), computed in fp32, returned in x's dtype.
    x [..., d], w [d] initialised to ones."""

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * x32).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding E [vocab, d]: ids [...] -> E[ids] [..., d] in the compute dtype; `attend`
    gives logits h E^T for tied output heads."""

    def __init__(self, vocab_size: int, dim: int, *, std: float, policy: PrecisionPolicy, rngs: nnx.Rngs):
        self.policy = policy
        self.embedding = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), std, policy.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.policy.compute_dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        dtype = self.policy.compute_dtype
        return einsum_fp32("...d,vd->...v", h.astype(dtype), self.embedding[...].astype(dtype))


class LMHead(nnx.Module):
    """Output head W_out [d, vocab]: h [..., d] -> logits [..., vocab] in fp32 (accumulated in
    fp32 from compute-dtype operands; the backward GEMMs take the cotangent rounded to the
    compute dtype, `precision.mixed`).  Kept out of the precision policy's fp8 recipes (the
    report keeps the head in high precision)."""

    def __init__(self, dim: int, vocab_size: int, *, std: float, policy: PrecisionPolicy, rngs: nnx.Rngs):
        self.policy = policy
        self.kernel = normal_param(rngs, (dim, vocab_size), ("embed", "vocab"), std, policy.param_dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        dtype = self.policy.compute_dtype
        return einsum_fp32("...d,dv->...v", h.astype(dtype), self.kernel[...].astype(dtype))
