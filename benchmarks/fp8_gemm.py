"""Blockwise-scaled fp8 GEMM kernels (`frontier_jax/kernels/fp8_gemm.py`): correctness against
the XLA reference of `precision/gemm.py` and speed against cuBLAS bf16 and XLA per-tensor fp8.

    python benchmarks/fp8_gemm.py            # on the GPU; JSON to $OUT/fp8_gemm.json if OUT is set
    python benchmarks/fp8_gemm.py --smoke    # tiny shapes, Pallas interpret mode (CPU)

Problems (fp8_deepseek scaling: lhs 1 x 128 tiles, rhs 128 x 128 blocks, or 1 x 128 along the
rows for the weight gradient; e4m3):
  * dense NT GEMMs at 4096^3 and 8192^3;
  * the bench-1b routed experts: 262144 tile-aligned rows in 64 equal groups, K 1024 -> N 768
    and K 384 -> N 1024 (grouped rows kernel), and their weight gradients dW [64, K, N].
Per problem: the kernel's max |kernel - XLA| / max |XLA| (grouped: on the first two groups),
then median times (batches of calls after warm-up, rotating input sets) of
  bf16     cuBLAS `jnp.dot` of the same FLOPs, B stored [K, N] (the ratio's reference);
  fp8_pt   XLA per-tensor fp8: `lax.dot_general` of two e4m3 operands, B stored [N, K],
           fp32 result times the two scales (dense problems only);
  kernel   the blockwise kernel for each tiling of the sweep (dense 8192^3: the full sweep;
           elsewhere the default and the best tiling found there);
  xla      the XLA blockwise path (`gemm._xla_scaled_matmul`), once, at 4096^3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.kernels import fp8_gemm
from frontier_jax.kernels.fp8_gemm import Fp8Tiling
from frontier_jax.precision import gemm
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3

SWEEP = [Fp8Tiling(128, 128, 4, 4), Fp8Tiling(128, 128, 8, 3), Fp8Tiling(128, 256, 8, 3),
         Fp8Tiling(128, 256, 8, 4), Fp8Tiling(64, 128, 4, 4), Fp8Tiling(64, 256, 4, 4),
         Fp8Tiling(128, 64, 4, 4)]
SETS = 3  # input sets rotated through while timing
RESULTS: list[dict] = []


def median_seconds(fn, inputs, batches: int, calls: int) -> float:
    """Median over `batches` of the mean time of `calls` back-to-back calls (rotating inputs)."""
    for args in inputs:
        jax.block_until_ready(fn(*args))
    times = []
    for b in range(batches):
        start = time.perf_counter()
        outs = [fn(*inputs[(b * calls + i) % len(inputs)]) for i in range(calls)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def record(problem: str, impl: str, flops: float, seconds: float, **extra) -> None:
    RESULTS.append(dict(problem=problem, impl=impl, ms=seconds * 1e3,
                        tflops=flops / seconds / 1e12, **extra))
    print(f"{problem:24s} {impl:44s} {seconds * 1e3:9.3f} ms {flops / seconds / 1e12:8.1f} TFLOP/s",
          flush=True)


def random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def tiling_name(t: Fp8Tiling) -> str:
    return f"kernel {t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}"


def time_bf16(problem, m, n, k, args):
    """cuBLAS bf16 GEMM of [m, k] x [k, n] (the reference of the ratios)."""
    inputs = [(random((m, k), 2 * s).astype(jnp.bfloat16),
               random((k, n), 2 * s + 1).astype(jnp.bfloat16)) for s in range(SETS)]
    record(problem, "bf16 jnp.dot (B [K,N])", 2 * m * n * k,
           median_seconds(jax.jit(jnp.dot), inputs, args.batches, args.calls))


def dense(problem, m, n, k, tilings, args, xla_blockwise=False):
    """Dense NT problem: check, then bf16, XLA per-tensor fp8, kernel tilings (, XLA blockwise)."""
    flops = 2 * m * n * k
    quantized = [(quantize(random((m, k), 2 * s), E4M3, (1, 128)),
                  quantize(random((n, k), 2 * s + 1), E4M3, (128, 128))) for s in range(SETS)]
    a, b = quantized[0]
    kernel = lambda t: jax.jit(lambda a, b: fp8_gemm.fp8_matmul_nt(
        a.qvalue, a.scale, b.qvalue, b.scale, out_dtype=jnp.bfloat16, tiling=t))
    err = rel_err(jax.jit(lambda a, b: fp8_gemm.fp8_matmul_nt(a.qvalue, a.scale, b.qvalue,
                                                              b.scale))(a, b),
                  jax.jit(gemm._xla_scaled_matmul)(a, b))
    print(f"{problem:24s} kernel vs XLA blockwise: rel err {err:.2e}", flush=True)
    RESULTS.append(dict(problem=problem, impl="check", rel_err=err))
    time_bf16(problem, m, n, k, args)
    per_tensor = [(quantize(random((m, k), 2 * s), E4M3, (None, None)),
                   quantize(random((n, k), 2 * s + 1), E4M3, (None, None))) for s in range(SETS)]
    fp8_pt = jax.jit(lambda a, b: (jax.lax.dot_general(
        a.qvalue, b.qvalue, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        * (a.scale * b.scale)).astype(jnp.bfloat16))
    record(problem, "fp8_pt XLA per-tensor (B [N,K])", flops,
           median_seconds(fp8_pt, per_tensor, args.batches, args.calls))
    for t in tilings:
        record(problem, tiling_name(t), flops,
               median_seconds(kernel(t), quantized, args.batches, args.calls), tiling=str(t))
    if xla_blockwise:
        record(problem, "xla blockwise (gemm._xla_scaled_matmul)", flops,
               median_seconds(jax.jit(gemm._xla_scaled_matmul), quantized, 2, 2))


def grouped_inputs(rows, groups, k, n, seed):
    """Tile-aligned rows x [rows, K] (1 x 128 tiles) and W^T [G, N, K] (128 x 128 blocks)."""
    x = quantize(random((rows, k), seed), E4M3, (1, 128))
    w = quantize(random((groups, n, k), seed + 1), E4M3, (1, 128, 128))
    return x, w


def grouped_rows(problem, rows, groups, k, n, tilings, args):
    """Forward of the experts: out[r] = x[r] W[g(r)]^T, equal groups of rows / groups rows."""
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    tile_group = gemm.row_groups(sizes // fp8_gemm.ROW_TILE, rows // fp8_gemm.ROW_TILE)
    inputs = [grouped_inputs(rows, groups, k, n, 2 * s) for s in range(SETS)]
    kernel = lambda t, dtype=jnp.bfloat16: jax.jit(lambda x, w, tg: fp8_gemm.fp8_grouped_rows_nt(
        x.qvalue, x.scale, w.qvalue, w.scale, tg, out_dtype=dtype, tiling=t))
    x, w = inputs[0]
    head = 2 * (rows // groups)  # the rows of the first two groups
    got = kernel(fp8_gemm.DEFAULT_TILING, jnp.float32)(x, w, tile_group)[:head]
    want = jax.jit(gemm._xla_scaled_grouped_matmul)(
        jax.tree.map(lambda a: a[:head], x), w, sizes.at[2:].set(0))
    err = rel_err(got, want)
    print(f"{problem:24s} kernel vs XLA grouped (groups 0, 1): rel err {err:.2e}", flush=True)
    RESULTS.append(dict(problem=problem, impl="check", rel_err=err))
    time_bf16(problem, rows, n, k, args)
    for t in tilings:
        record(problem, tiling_name(t), 2 * rows * n * k,
               median_seconds(kernel(t), [(x, w, tile_group) for x, w in inputs], args.batches,
                              args.calls), tiling=str(t))


def weight_grad(problem, rows, groups, k, n, tilings, args):
    """Weight gradient of the experts: dW[g] = x_g^T dy_g from x^T [K, P], dy^T [N, P]."""
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    tile_group = gemm.row_groups(sizes // fp8_gemm.ROW_TILE, rows // fp8_gemm.ROW_TILE)
    tile_start = jnp.searchsorted(tile_group, jnp.arange(groups + 1), side="left")
    inputs = [(quantize(random((k, rows), 2 * s), E4M3, (1, 128)),
               quantize(random((n, rows), 2 * s + 1), E4M3, (1, 128))) for s in range(SETS)]
    kernel = lambda t, dtype=jnp.bfloat16: jax.jit(
        lambda a, b, ts: fp8_gemm.fp8_grouped_weight_grad_nt(
            a.qvalue, a.scale, b.qvalue, b.scale, ts, out_dtype=dtype, tiling=t))
    a, b = inputs[0]
    head = 2 * (rows // groups)
    got = kernel(fp8_gemm.DEFAULT_TILING, jnp.float32)(a, b, tile_start)[:2]
    first = lambda q: jax.tree.map(lambda v: v[:, :v.shape[1] * head // rows], q)
    want = jax.jit(gemm._xla_scaled_grouped_matmul_tn, static_argnums=3)(
        first(a), first(b), tile_group[:head // fp8_gemm.ROW_TILE], 2)
    err = rel_err(got, want)
    print(f"{problem:24s} kernel vs XLA weight grad (groups 0, 1): rel err {err:.2e}", flush=True)
    RESULTS.append(dict(problem=problem, impl="check", rel_err=err))
    time_bf16(problem, k, n, rows, args)
    for t in tilings:
        record(problem, tiling_name(t), 2 * rows * n * k,
               median_seconds(kernel(t), [(a, b, tile_start) for a, b in inputs], args.batches,
                              args.calls), tiling=str(t))


def best_tiling(problem: str, rows_tile_max: int | None = None) -> Fp8Tiling:
    """The fastest kernel tiling measured on `problem` (block_m <= rows_tile_max if given)."""
    timed = [r for r in RESULTS if r["problem"] == problem and "tiling" in r]
    by_speed = sorted(timed, key=lambda r: r["ms"])
    tilings = {str(t): t for t in SWEEP}
    for r in by_speed:
        t = tilings[r["tiling"]]
        if rows_tile_max is None or t.block_m <= rows_tile_max:
            return t
    return fp8_gemm.DEFAULT_TILING


def summary() -> None:
    """Per problem: the bf16 reference, XLA per-tensor fp8, the best kernel tiling (, XLA)."""
    print(f"\n{'problem':24s} {'impl':44s} TFLOP/s  x bf16")
    for problem in dict.fromkeys(r["problem"] for r in RESULTS):
        rows = [r for r in RESULTS if r["problem"] == problem and "ms" in r]
        bf16 = next(r for r in rows if r["impl"].startswith("bf16"))
        kernels = [r for r in rows if "tiling" in r]
        shown = [bf16, *[r for r in rows if r["impl"].startswith(("fp8_pt", "xla"))]]
        shown += [min(kernels, key=lambda r: r["ms"])] if kernels else []
        for r in shown:
            print(f"{problem:24s} {r['impl']:44s} {r['tflops']:8.1f} {bf16['ms'] / r['ms']:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--batches", type=int, default=15, help="timed batches per figure")
    parser.add_argument("--calls", type=int, default=10, help="calls per batch")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.calls = 2, 1
        dense_shapes, sweep = [(256, 256, 256, True)], SWEEP[:2]
        experts, rows, groups = [(256, 128), (128, 256)], 1024, 4
    else:
        dense_shapes, sweep = [(8192, 8192, 8192, False), (4096, 4096, 4096, True)], SWEEP
        experts, rows, groups = [(1024, 768), (384, 1024)], 262144, 64
    print(f"device: {jax.devices()[0].device_kind}; interpret: {jax.default_backend() != 'gpu'}")
    start = time.perf_counter()
    for i, (m, n, k, xla) in enumerate(dense_shapes):
        tilings = sweep if i == 0 else list(dict.fromkeys(
            [fp8_gemm.DEFAULT_TILING, best_tiling(f"dense {dense_shapes[0][0]}^3")]))
        dense(f"dense {m}^3", m, n, k, tilings, args, xla_blockwise=xla)
    best = best_tiling(f"dense {dense_shapes[0][0]}^3")
    rows_best = best_tiling(f"dense {dense_shapes[0][0]}^3", rows_tile_max=fp8_gemm.ROW_TILE)
    for k, n in experts:
        grouped_rows(f"experts {k}->{n}", rows, groups, k, n,
                     list(dict.fromkeys([fp8_gemm.DEFAULT_TILING, rows_best])), args)
        weight_grad(f"expert wgrad {k}x{n}", rows, groups, k, n,
                    list(dict.fromkeys([fp8_gemm.DEFAULT_TILING, best])), args)
    summary()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "fp8_gemm.json")
        with open(path, "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "results": RESULTS}, fh, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
