"""Block-scaled fp8 weights, as in the official DeepSeek-V3 checkpoints.

config.json carries `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"weight_block_size": [b0, b1], ...}` ([128, 128] in the release).  A quantised weight
W [out, in] is stored as Q = `<module>.weight` (float8 e4m3) and S = `<module>.weight_scale_inv`
[ceil(out / b0), ceil(in / b1)] (float32), one factor per b0 x b1 block:

    W[i, j] = Q[i, j] * S[i // b0, j // b1]

(the last row/column of blocks may be partial; the broadcast scale is trimmed to W's shape).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_BLOCK = (128, 128)


def fp8_block_size(hf_config: dict) -> tuple[int, int] | None:
    """The (b0, b1) block of a block-scaled fp8 checkpoint, or None when it is not quantised.
    Any other quantisation scheme is rejected."""
    quant = hf_config.get("quantization_config")
    if not quant:
        return None
    method, fmt = quant.get("quant_method"), quant.get("fmt", "e4m3")
    if method != "fp8" or fmt != "e4m3":
        raise ValueError(
            f"HF config quantization_config (quant_method={method!r}, fmt={fmt!r}) is not "
            "supported; only block-scaled fp8 e4m3 (quant_method 'fp8') is"
        )
    block = tuple(quant.get("weight_block_size") or DEFAULT_BLOCK)
    if len(block) != 2:
        raise ValueError(f"HF config quantization_config.weight_block_size={list(block)} must have 2 entries")
    return block


def dequantize_blocks(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str) -> np.ndarray:
    """Q [out, in] (fp8), S [ceil(out/b0), ceil(in/b1)] -> W = Q * S per block, float32."""
    if q.ndim != 2:
        raise ValueError(f"fp8 tensor {name} has rank {q.ndim}; block scales are defined for 2-D weights")
    (rows, cols), (b0, b1) = q.shape, block
    expected = (math.ceil(rows / b0), math.ceil(cols / b1))
    if scale_inv.shape != expected:
        raise ValueError(
            f"HF tensor {name}_scale_inv: expected shape {expected} for weight {q.shape} "
            f"with {b0}x{b1} blocks, found {scale_inv.shape}"
        )
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=0), b1, axis=1)[:rows, :cols]
    return q.astype(np.float32) * scale
