"""The device's ceilings, measured: the figures MFU and bandwidth utilisation are quoted against.

    python benchmarks/ceilings.py [--size 8192] [--copy-gib 2] [--json FILE]
    python benchmarks/ceilings.py --size 256 --copy-gib 0.01 --batches 2 --calls 1   # CPU smoke

  * bf16 GEMM size^3 through XLA (cuBLAS on GPUs), B stored [K, N] (`jnp.dot`) and [N, K]
    (both operands contract their last dim, the layout of a Linear's weight W^T);
  * fp8 e4m3 x e4m3 GEMM size^3 through `lax.dot_general` (cuBLASLt on Hopper), fp32 result
    times the two per-tensor scales, bf16 out, with B [N, K] and B [K, N];
  * HBM copy bandwidth: y = 2 x over a bf16 array of copy-gib GiB, bytes read + written.

Each figure is the median over `--batches` of the mean of `--calls` back-to-back calls,
rotating three input sets (`fp8_gemm.median_seconds`), on random normal data (zeros run faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_gemm import SETS, median_seconds, random

from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3

NT = (((1,), (1,)), ((), ()))  # a [M, K] . b [N, K]
NN = (((1,), (0,)), ((), ()))  # a [M, K] . b [K, N]


def gemm_ceilings(size: int, batches: int, calls: int) -> list[dict]:
    flops = 2 * size**3
    rows = []

    def timed(name, fn, inputs):
        seconds = median_seconds(jax.jit(fn), inputs, batches, calls)
        rows.append({"what": name, "ms": seconds * 1e3, "tflops": flops / seconds / 1e12})
        print(f"{name:48s} {seconds * 1e3:8.3f} ms {flops / seconds / 1e12:8.1f} TFLOP/s", flush=True)

    for layout, dims in (("[K,N]", NN), ("[N,K]", NT)):
        inputs = [
            (
                random((size, size), 2 * s).astype(jnp.bfloat16),
                random((size, size), 2 * s + 1).astype(jnp.bfloat16),
            )
            for s in range(SETS)
        ]
        timed(
            f"bf16 GEMM {size}^3, B {layout}", lambda a, b, dims=dims: jax.lax.dot_general(a, b, dims), inputs
        )
    for layout, dims in (("[N,K]", NT), ("[K,N]", NN)):
        inputs = [
            (
                quantize(random((size, size), 2 * s), E4M3, (None, None)),
                quantize(random((size, size), 2 * s + 1), E4M3, (None, None)),
            )
            for s in range(SETS)
        ]

        def fp8(a, b, dims=dims):
            out = jax.lax.dot_general(a.qvalue, b.qvalue, dims, preferred_element_type=jnp.float32)
            return (out * (a.scale * b.scale)).astype(jnp.bfloat16)

        timed(f"fp8 e4m3 GEMM {size}^3 (per-tensor), B {layout}", fp8, inputs)
    return rows


def copy_bandwidth(gib: float, batches: int, calls: int) -> dict:
    n = int(gib * 2**30) // 2
    inputs = [(random((n,), s).astype(jnp.bfloat16),) for s in range(SETS)]
    seconds = median_seconds(jax.jit(lambda x: x * 2), inputs, batches, calls)
    gbs = 2 * 2 * n / seconds / 1e9
    print(
        f"{'HBM copy y = 2x, ' + f'{gib:g} GiB bf16 (read + write)':48s} {seconds * 1e3:8.3f} ms "
        f"{gbs:8.0f} GB/s",
        flush=True,
    )
    return {"what": f"HBM copy {gib:g} GiB bf16, read + write", "ms": seconds * 1e3, "gb_per_s": gbs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--copy-gib", type=float, default=2.0)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--json", help="write the figures to this JSON file")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}")
    rows = gemm_ceilings(args.size, args.batches, args.calls)
    rows.append(copy_bandwidth(args.copy_gib, args.batches, args.calls))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": jax.devices()[0].device_kind, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
