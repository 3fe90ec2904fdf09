"""Basic layers: parameters with logical axis names, projections through the precision policy,
RMSNorm and the token embedding."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from frontier_jax.precision import PrecisionPolicy
from frontier_jax.precision.mixed import einsum_fp32


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float,
                 dtype=jnp.float32) -> nnx.Param:
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

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], axes: Sequence[str], *,
                 name: str, std: float, policy: PrecisionPolicy, rngs: nnx.Rngs):
        self.in_rank = len(in_shape)
        self.name = name
        self.policy = policy
        self.kernel = normal_param(rngs, (*in_shape, *out_shape), axes, std, policy.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.policy.compute_dtype
        kernel = self.kernel[...]
        x_dims = tuple(range(x.ndim - self.in_rank, x.ndim))
        w_dims = tuple(range(self.in_rank))
        dot = self.policy.dot_general(self.name)
        return dot(x.astype(dtype), kernel.astype(dtype), ((x_dims, w_dims), ((), ())))


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

    def __init__(self, vocab_size: int, dim: int, *, std: float, policy: PrecisionPolicy,
                 rngs: nnx.Rngs):
        self.policy = policy
        self.embedding = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), std,
                                      policy.param_dtype)

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

    def __init__(self, dim: int, vocab_size: int, *, std: float, policy: PrecisionPolicy,
                 rngs: nnx.Rngs):
        self.policy = policy
        self.kernel = normal_param(rngs, (dim, vocab_size), ("embed", "vocab"), std, policy.param_dtype)

    def __call__(self, h: jax.Array) -> jax.Array:
        dtype = self.policy.compute_dtype
        return einsum_fp32("...d,dv->...v", h.astype(dtype), self.kernel[...].astype(dtype))
