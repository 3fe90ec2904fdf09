"""Fused two-axis fp8 quantization (`frontier_jax/kernels/fp8_quantize.py`) against XLA's
quantization and a bandwidth baseline, at the bench-1b step's activation shapes.

    python benchmarks/fp8_quantize.py                 # GPU; JSON to $OUT/fp8_quantize.json
    python benchmarks/fp8_quantize.py --smoke         # tiny shapes, interpret mode (CPU)

Per shape x [M, K] (bf16): the baseline `-x` (reads and writes x once: what HBM allows), XLA's
`quantize` for both operands (1 x 128 rows, transposed 128 x 1 columns), and the fused kernel
for both, rows only and columns only, over NUM_WARPS.  Bytes moved per element: 2 read plus 1
written per fp8 operand (scales add 4 / 128 per operand); GB/s = bytes / median time.  Each
kernel result is checked bit-equal to XLA's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.kernels.fp8_quantize import NUM_WARPS, quantize_rows_cols
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_gemm import median_seconds  # noqa: E402

# bench-1b: routed rows (32768 tokens x top-8, tile-aligned) x (d, 2f, f); tokens x d
SHAPES = [(262144, 1024), (262144, 768), (262144, 384), (32768, 1024)]
WARPS = sorted({NUM_WARPS, 4, 8, 16})


def xla_both(x):
    return quantize(x, E4M3, (1, 128)), quantize(x, E4M3, (128, 1)).T


def same_bits(got, want) -> bool:
    return all(
        np.array_equal(
            np.asarray(g).view(np.uint8) if g.dtype == E4M3 else np.asarray(g),
            np.asarray(w).view(np.uint8) if w.dtype == E4M3 else np.asarray(w),
        )
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    shapes = [(256, 384)] if args.smoke else SHAPES
    if args.smoke:
        args.batches, args.calls = 2, 1
    results = []
    print(f"{'shape':>14s} {'impl':28s} {'ms':>8s} {'GB/s':>7s} {'x copy':>7s}")
    for m, k in shapes:
        inputs = [
            (jax.random.normal(jax.random.key(s), (m, k), jnp.float32).astype(jnp.bfloat16),)
            for s in range(3)
        ]
        want = jax.jit(xla_both)(*inputs[0])
        elements, copy_ms = m * k, None
        cases = [
            ("copy (-x)", jax.jit(jnp.negative), 4.0, None),
            ("xla quantize rows+cols", jax.jit(xla_both), 6 + 8 / 128, None),
        ]
        for w in WARPS:
            cases += [
                (
                    f"fused rows+cols w{w}",
                    jax.jit(lambda x, w=w: quantize_rows_cols(x, E4M3, num_warps=w)),
                    4 + 8 / 128,
                    want,
                ),
                (
                    f"fused rows w{w}",
                    jax.jit(lambda x, w=w: quantize_rows_cols(x, E4M3, cols=False, num_warps=w)[:1]),
                    3 + 4 / 128,
                    want[:1],
                ),
                (
                    f"fused cols w{w}",
                    jax.jit(lambda x, w=w: quantize_rows_cols(x, E4M3, rows=False, num_warps=w)[1:]),
                    3 + 4 / 128,
                    want[1:],
                ),
            ]
        for name, fn, bytes_per_element, check in cases:
            if check is not None and not same_bits(fn(*inputs[0]), check):
                raise SystemExit(f"{name} at {m}x{k}: bits differ from XLA's quantize")
            seconds = median_seconds(fn, inputs, args.batches, args.calls)
            copy_ms = copy_ms or seconds * 1e3
            gbps = elements * bytes_per_element / seconds / 1e9
            results.append(dict(m=m, k=k, impl=name, ms=seconds * 1e3, gbps=gbps))
            print(
                f"{m:>7d}x{k:<6d} {name:28s} {seconds * 1e3:8.3f} {gbps:7.0f} {seconds * 1e3 / copy_ms:7.2f}",
                flush=True,
            )
    out = Path(os.environ.get("OUT", ".")) / "fp8_quantize.json"
    out.write_text(json.dumps(dict(device=str(jax.devices()[0]), results=results), indent=1))


if __name__ == "__main__":
    main()
