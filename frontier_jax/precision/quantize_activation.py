"""An activation (or output gradient) x [M, K] quantized for the GEMMs that consume it:

    rows  recipe.row_tiles  (1 x B along K)   lhs of y = x W and dx = dy W^T      [M, K']
    cols  recipe.col_tiles  (B x 1 along M)   transposed: x^T, dy^T of the weight
                                              gradient (NT form)                   [K', M']
(K', M': zero-padded to the recipe's block B).  With blockwise scales on the kernel path both
come from one fused pass over x (`kernels/fp8_quantize.py`, same bits as `quantize`), else from
`quantize` (XLA)."""

from __future__ import annotations

import jax
import qwix

from frontier_jax.kernels.fp8_quantize import BLOCK, quantize_rows_cols
from frontier_jax.precision import gemm
from frontier_jax.precision.quantize import pad_to_multiple, quantize
from frontier_jax.precision.recipe import Fp8Recipe


def quantize_activation(
    x: jax.Array, qtype, recipe: Fp8Recipe, *, rows: bool = True, cols: bool = True
) -> tuple[qwix.QArray | None, qwix.QArray | None]:
    """(rows operand or None, cols operand (transposed) or None) of x [M, K] (see above)."""
    b = recipe.multiple
    if gemm.use_kernel() and recipe.block == BLOCK:
        q_rows, q_cols = quantize_rows_cols(pad_to_multiple(x, (b, b)), qtype, rows=rows, cols=cols)
        if q_rows is not None:  # one scale per row: the padding rows drop out exactly
            q_rows = qwix.QArray(q_rows.qvalue[: x.shape[0]], q_rows.scale[: x.shape[0]])
        return q_rows, q_cols
    return (
        quantize(pad_to_multiple(x, (1, b)), qtype, recipe.row_tiles) if rows else None,
        quantize(pad_to_multiple(x, (b, b)), qtype, recipe.col_tiles).T if cols else None,
    )
