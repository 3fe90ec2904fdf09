"""Precision policies.

A `PrecisionPolicy` decides, for every projection of the model, the dot-general that runs it
(the hook through which fp8 recipes plug in) and the dtype activations are computed in.
Master weights always stay in `param_dtype` (fp32); norms, router, softmax and the loss run
in fp32 regardless of the policy.  Changing the recipe is a config change, never a model edit.

fp8 policies (`fp8_tensor`, `fp8_deepseek`, recipes in `recipe.py`) run every projection whose
layer name matches one of `fp8_layers` (fnmatch patterns; default "*": all of them) as three fp8
GEMMs.  The projections that reach the policy are the `Linear` layers
    mla.wq_a mla.wq_b (or mla.wq) mla.wkv_a mla.wk_rope mla.wk_b mla.wv_b mla.wo,
    dense_ffn.{w_gate,w_up,w_down}, moe.shared.{w_gate,w_up,w_down}, mtp.proj
and the routed experts' grouped matmuls (`grouped_matmul(layer)`, names
moe.experts.{w_gate,w_up,w_down}).  Embedding, output head (and so the MTP heads), router,
norms and the attention core never call the policy and stay in bf16/fp32.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable

import jax
import jax.numpy as jnp

from frontier_jax.precision.mixed import dot_general_fp32
from frontier_jax.precision.recipe import FP8_DEEPSEEK, FP8_TENSOR, Fp8Recipe

DotGeneral = Callable[..., jax.Array]
GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _dot_general_accumulate_fp32(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` on operands in the compute dtype, accumulated in fp32 and returned in
    the operands' dtype (what cuBLAS does for bf16 GEMMs); its backward GEMMs run in the
    operands' dtype too (`mixed.dot_general_fp32`)."""
    del precision  # the compute dtype fixes the arithmetic
    return dot_general_fp32(lhs, rhs, dimension_numbers).astype(preferred_element_type or lhs.dtype)


@functools.cache
def _note_fp8_backend(policy: str, platform: str, compute_capability: str) -> None:
    """Logged once per process and backend (a warning where emulated).  On a GPU of compute
    capability >= 8.9 the fp8 GEMMs run as Pallas kernels (`kernels/fp8_gemm.py`); without fp8
    matrix units XLA emulates the fp8 dots in fp32: the recipe's numerics exactly (fp8 values
    and their products are exact in fp32), without the fp8 speed-up."""
    native = platform == "gpu" and float(compute_capability or 0) >= 8.9
    logging.getLogger(__name__).log(
        logging.INFO if native else logging.WARNING,
        "precision.policy=%s: fp8 GEMMs run %s",
        policy,
        "as Pallas kernels on gpu"
        if native
        else f"through the XLA reference path on {platform} (no fp8 matrix units: emulated, same "
        "numerics, no speed-up)",
    )


@dataclass(frozen=True)
class PrecisionPolicy:
    """name: registry key; compute_dtype: dtype of activations and projection operands;
    param_dtype: master-weight dtype; fp8: the fp8 recipe (None: none); fp8_layers: fnmatch
    patterns of the layer names the recipe applies to."""

    name: str
    compute_dtype: jnp.dtype
    param_dtype: jnp.dtype = jnp.float32
    fp8: Fp8Recipe | None = None
    fp8_layers: tuple[str, ...] = ("*",)

    def uses_fp8(self, layer: str) -> bool:
        """Whether `layer` runs in fp8; a joint projection "a+b" (`layers.project_jointly`)
        does when all its parts do."""
        return self.fp8 is not None and all(
            any(fnmatch(part, p) for p in self.fp8_layers) for part in layer.split("+")
        )

    def dot_general(self, layer: str) -> DotGeneral:
        """The dot-general used by the projection called `layer` (e.g. "mla.wq_b")."""
        if self.uses_fp8(layer):
            from frontier_jax.precision.fp8_linear import fp8_dot_general  # needs qwix

            self._note_backend()
            return fp8_dot_general(self.fp8, layer=layer, policy=self.name)
        if self.compute_dtype == jnp.float32:
            return jax.lax.dot_general
        return _dot_general_accumulate_fp32

    def grouped_matmul(self, layer: str) -> GroupedMatmul | None:
        """(x [M, K], w [G, K, N], group_sizes [G]) -> [M, N] in fp8 for the expert matmul
        `layer` (e.g. "moe.experts.w_up"), or None: the layer then runs in the compute dtype
        through `impl.gmm`."""
        if not self.uses_fp8(layer):
            return None
        from frontier_jax.precision.fp8_grouped import fp8_grouped_matmul  # needs qwix

        self._note_backend()
        return functools.partial(
            fp8_grouped_matmul, recipe=self.fp8, where=f"layer {layer!r} (precision.policy={self.name})"
        )

    def _note_backend(self) -> None:
        device = jax.devices()[0]
        _note_fp8_backend(self.name, device.platform, getattr(device, "compute_capability", ""))


POLICIES = {
    "fp32": PrecisionPolicy("fp32", jnp.float32),
    "bf16": PrecisionPolicy("bf16", jnp.bfloat16),
    "fp8_tensor": PrecisionPolicy("fp8_tensor", jnp.bfloat16, fp8=FP8_TENSOR),
    "fp8_deepseek": PrecisionPolicy("fp8_deepseek", jnp.bfloat16, fp8=FP8_DEEPSEEK),
}


def get_policy(name: str) -> PrecisionPolicy:
    if name not in POLICIES:
        raise ValueError(
            f"precision.policy={name!r} is not a known policy; allowed values are {', '.join(POLICIES)}"
        )
    return POLICIES[name]
