"""fp8 recipes: how the operands of a projection's three GEMMs are scaled into fp8.

For y = x W with x [M, K], W [K, N] and the output gradient dy [M, N], training runs
    forward  y  = x  W      contraction over K
    dgrad    dx = dy W^T    contraction over N
    wgrad    dW = x^T dy    contraction over M (tokens)
each as an fp8 GEMM with fp32 accumulation.  Every operand is split into tiles, each tile gets
the current scale s = amax(|tile|) / fp8_max and is stored as q = fp8(x / s) (x ~ q s).

Tiles are given per axis of a 2-D operand: None = the whole axis shares one scale, 1 = every
index has its own scale, t > 1 = tiles of t along that axis.

    recipe          x, dy (as lhs)   x, dy (wgrad)   W            dy format
    fp8_tensor      (None, None)     (None, None)    (None, None) e5m2  (max 57344)
    fp8_deepseek    (1, 128)         (128, 1)        (128, 128)   e4m3  (max 448)

x and W are always e4m3 (max 448).  This module holds configuration only (no qwix import), so
bf16/fp32 runs never load the fp8 code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
# checkpoint name of every quantized weight (a residual of its projection's backward): remat
# policies save it, so a recomputed forward does not quantize the weights again
FP8_WEIGHT = "fp8_weight"


@dataclass(frozen=True)
class Fp8Recipe:
    """block: tile edge along contractions (DeepSeek-V3: 128), or None for one scale per
    tensor; grad_dtype: fp8 format of the output gradient dy."""

    block: int | None
    grad_dtype: Any

    @property
    def multiple(self) -> int:
        """Operand dimensions are zero-padded to a multiple of this (exact: zeros change no
        tile's amax and add nothing to a sum; a tile that is all padding gets scale 1)."""
        return self.block or 1

    @property
    def row_tiles(self) -> tuple:
        """lhs [M, K] of a GEMM contracting K: 1 x block tiles (one scale per row per block)."""
        return (None, None) if self.block is None else (1, self.block)

    @property
    def col_tiles(self) -> tuple:
        """x [M, K] and dy [M, N] in wgrad, which contracts the token axis M: block x 1 tiles."""
        return (None, None) if self.block is None else (self.block, 1)

    @property
    def weight_tiles(self) -> tuple:
        """W [K, N]: block x block tiles, valid for W in the forward and W^T in dgrad alike."""
        return (None, None) if self.block is None else (self.block, self.block)


FP8_TENSOR = Fp8Recipe(block=None, grad_dtype=E5M2)
FP8_DEEPSEEK = Fp8Recipe(block=128, grad_dtype=E4M3)
