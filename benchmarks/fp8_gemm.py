"""Blockwise-scaled fp8 GEMM kernels (`frontier_jax/kernels/fp8_gemm.py`): correctness against
the XLA reference of `precision/gemm.py` and speed against cuBLAS bf16 and XLA per-tensor fp8.

    python benchmarks/fp8_gemm.py --batches 8 --calls 5   # GPU; JSON to $OUT/fp8_gemm.json
    python benchmarks/fp8_gemm.py --sweep 128x128w8s4g8,64x128w4s4g8   # own dense sweep
    python benchmarks/fp8_gemm.py --smoke                 # tiny shapes, interpret mode (CPU)
    python benchmarks/fp8_gemm.py --step-shapes           # the dense GEMMs of a bench-1b step

On Hopper the dense and grouped-rows problems also run the Mosaic GPU kernels (`kernels/fp8_gemm_mgpu.py`,
tilings MGPU_TILINGS, named mgpu128xTILE_NsSTAGES + snake order; b's scales one per 128 x 128
block), which `precision.gemm` uses for dense blockwise GEMMs there.

Tilings are named BMxBNwWARPSsSTAGESgGROUP_M plus flags (l: lagged scaling, f: tensor-core
accumulation over all of K in the per-tensor path, p: Pallas' own dot lowering, i.e. Triton's
split fp8 accumulation: the kernels before the native dot); see `Fp8Tiling`.

Problems (fp8_deepseek scaling: lhs 1 x 128 tiles, rhs 128 x 128 blocks, or 1 x 128 along the
rows for the weight gradient; e4m3):
  * dense NT 8192^3: the whole sweep (SWEEP or --sweep), then the per-tensor path of the kernel
    (scales applied once, in the epilogue) and e5m2 x e4m3 operands with the best tiling;
  * dense NT 4096^3 and the bench-1b routed experts (262144 tile-aligned rows in 64 equal
    groups, K 1024 -> N 768 and K 384 -> N 1024: grouped rows kernel; their weight gradients
    dW [64, K, N]): the best --top tilings of the sweep (block_m <= 128 for grouped rows).
Per kernel: median time (batches of calls after warm-up, rotating input sets) and err =
max |kernel - XLA| / max |XLA| of its output (bf16 output: ~4e-3 is rounding; grouped: the
first two groups).  References: bf16 cuBLAS `jnp.dot` of the same FLOPs (B stored [K, N]; the
x bf16 column), XLA per-tensor fp8 (`lax.dot_general` of two e4m3 operands, B [N, K], fp32
result times the two scales; cuBLASLt), and the XLA blockwise path once at 4096^3.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from frontier_jax.kernels import fp8_gemm, fp8_gemm_mgpu
from frontier_jax.kernels.fp8_gemm import Fp8Tiling
from frontier_jax.kernels.grouped_gemm import TILE_ROWS
from frontier_jax.precision import gemm
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3, E5M2

# dense 8192^3 sweep: today's kernel (Pallas dot) as the baseline, then the native fp8 dot over
# warps per 128-row tile (one warpgroup vs two), pipeline depth, program order and tile shape
SWEEP = [
    "64x128w4s4g1p",
    "64x128w4s4g8",
    "128x128w4s4g8",
    "128x128w8s3g8",
    "128x128w8s4g8",
    "128x128w8s5g8",
    "128x128w8s4g1",
    "128x128w8s4g16",
    "128x128w8s4g8l",
    "128x256w8s3g8",
    "256x128w8s3g8",
    "64x256w4s3g8",
    "128x64w4s4g8",
]
# Mosaic GPU dense kernel (Hopper): CTA tile 128 x tile_n, pipeline stages, snake order
MGPU_TILINGS = [
    fp8_gemm_mgpu.MgpuTiling(),
    fp8_gemm_mgpu.MgpuTiling(grid_minor="m"),
    fp8_gemm_mgpu.MgpuTiling(stages=5, grid_minor="m"),
]
# the dense fp8 projections of a bench-1b step (16 x 2048 tokens; K -> N, joint projections
# as one GEMM, N padded to 128): each runs as forward [T, K] x [N, K], dgrad [T, N] x [K, N] and
# wgrad [K, T] x [N, T] (timed here with b in 128 x 128 blocks, as the forward's W)
STEP_TOKENS = 32768
STEP_SHAPES = [
    ("mla W^DQ|W^DKV|W^KR", 1024, 768),
    ("mla W^UQ", 384, 1536),
    ("mla W^UK|W^UV", 256, 2048),
    ("mla W^O", 1024, 1024),
    ("shared gate|up", 1024, 768),
    ("shared down", 384, 1024),
]
PER_TENSOR_FAST = "128x256w8s3g8f"  # per-tensor path, tensor-core accumulation over all of K
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
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


def record(problem: str, impl: str, flops: float, seconds: float, **extra) -> None:
    RESULTS.append(dict(problem=problem, impl=impl, ms=seconds * 1e3, tflops=flops / seconds / 1e12, **extra))
    err = f"  err {extra['rel_err']:.1e}" if "rel_err" in extra else ""
    print(
        f"{problem:22s} {impl:40s} {seconds * 1e3:9.3f} ms {flops / seconds / 1e12:8.1f} TFLOP/s{err}",
        flush=True,
    )


def time_kernel(problem, name, make, inputs, want, flops, args, **extra) -> None:
    """Times `make()` (a jitted kernel call) on `inputs` and checks its first output against
    `want` (a function of that output); a kernel that fails to compile or run is recorded as
    failed and the run goes on."""
    start = time.perf_counter()
    try:
        fn = make()
        err = want(fn(*inputs[0]))
        seconds = median_seconds(fn, inputs, args.batches, args.calls)
    except Exception as e:  # noqa: BLE001 - one tiling failing must not end the sweep
        message = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        print(f"{problem:22s} {name:40s} FAILED: {message}", flush=True)
        RESULTS.append(dict(problem=problem, impl=name, failed=message, **extra))
        return
    record(problem, name, flops, seconds, rel_err=err, wall_s=time.perf_counter() - start, **extra)


def random(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def time_bf16(problem, m, n, k, args):
    """cuBLAS bf16 GEMM of [m, k] x [k, n] (the reference of the ratios)."""
    inputs = [
        (random((m, k), 2 * s).astype(jnp.bfloat16), random((k, n), 2 * s + 1).astype(jnp.bfloat16))
        for s in range(SETS)
    ]
    record(
        problem,
        "bf16 jnp.dot (B [K,N])",
        2 * m * n * k,
        median_seconds(jax.jit(jnp.dot), inputs, args.batches, args.calls),
    )


def dense(problem, m, n, k, tilings, args, xla_blockwise=False, extras=False):
    """Dense NT problem: bf16, XLA per-tensor fp8, the kernel tilings (, XLA blockwise; extras:
    the kernel's per-tensor path and e5m2 x e4m3 operands with the best tiling)."""
    flops = 2 * m * n * k
    quantized = [
        (
            quantize(random((m, k), 2 * s), E4M3, (1, 128)),
            quantize(random((n, k), 2 * s + 1), E4M3, (128, 128)),
        )
        for s in range(SETS)
    ]
    want = jax.jit(gemm._xla_scaled_matmul)(*quantized[0])
    check = functools.partial(rel_err, want=want)
    time_bf16(problem, m, n, k, args)
    per_tensor = [
        (
            quantize(random((m, k), 2 * s), E4M3, (None, None)),
            quantize(random((n, k), 2 * s + 1), E4M3, (None, None)),
        )
        for s in range(SETS)
    ]
    fp8_pt = jax.jit(
        lambda a, b: (
            jax.lax.dot_general(
                a.qvalue, b.qvalue, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
            )
            * (a.scale * b.scale)
        ).astype(jnp.bfloat16)
    )
    record(
        problem,
        "fp8_pt XLA per-tensor (B [N,K])",
        flops,
        median_seconds(fp8_pt, per_tensor, args.batches, args.calls),
    )
    kernel = lambda t: (
        lambda: jax.jit(
            lambda a, b: fp8_gemm.fp8_matmul_nt(
                a.qvalue, a.scale, b.qvalue, b.scale, out_dtype=jnp.bfloat16, tiling=t
            )
        )
    )
    for t in tilings:
        time_kernel(problem, f"kernel {t.name}", kernel(t), quantized, check, flops, args, tiling=t.name)
    if fp8_gemm_mgpu.is_hopper():
        mgpu = lambda t: (
            lambda: jax.jit(
                lambda a, b: fp8_gemm_mgpu.fp8_matmul_nt_mgpu(
                    a.qvalue,
                    b.qvalue,
                    *fp8_gemm_mgpu.chunk_scales(a.scale, b.scale, m, n, k),
                    out_dtype=jnp.bfloat16,
                    tiling=t,
                )
            )
        )
        for t in MGPU_TILINGS:
            time_kernel(problem, f"kernel {t.name}", mgpu(t), quantized, check, flops, args)
    del want, check
    if extras and (best := best_tilings(problem, 1)):
        pt_want = jax.jit(
            lambda a, b: (
                jax.lax.dot_general(
                    a.qvalue, b.qvalue, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
                )
                * (a.scale * b.scale)
            )
        )(*per_tensor[0])
        for t in dict.fromkeys([best[0], Fp8Tiling.parse(PER_TENSOR_FAST)]):
            time_kernel(
                problem,
                f"kernel per-tensor {t.name}",
                kernel(t),
                per_tensor,
                lambda out: rel_err(out, pt_want),
                flops,
                args,
                per_tensor=t.name,
            )
        del pt_want
        mixed = [(quantize(random((m, k), 2 * s), E5M2, (1, 128)), b) for s, (_, b) in enumerate(quantized)]
        mixed_want = jax.jit(gemm._xla_scaled_matmul)(*mixed[0])
        time_kernel(
            problem,
            f"kernel e5m2 x e4m3 {best[0].name}",
            kernel(best[0]),
            mixed,
            lambda out: rel_err(out, mixed_want),
            flops,
            args,
            mixed=best[0].name,
        )
    if xla_blockwise:
        record(
            problem,
            "xla blockwise (gemm._xla_scaled_matmul)",
            flops,
            median_seconds(jax.jit(gemm._xla_scaled_matmul), quantized, 2, 2),
        )


def grouped_inputs(rows, groups, k, n, seed):
    """Tile-aligned rows x [rows, K] (1 x 128 tiles) and W^T [G, N, K] (128 x 128 blocks)."""
    x = quantize(random((rows, k), seed), E4M3, (1, 128))
    w = quantize(random((groups, n, k), seed + 1), E4M3, (1, 128, 128))
    return x, w


def grouped_rows(problem, rows, groups, k, n, tilings, args):
    """Forward of the experts: out[r] = x[r] W[g(r)]^T, equal groups of rows / groups rows."""
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    tile_group = gemm.row_groups(sizes // TILE_ROWS, rows // TILE_ROWS)
    inputs = [(*grouped_inputs(rows, groups, k, n, 2 * s), tile_group) for s in range(SETS)]
    x, w, _ = inputs[0]
    head = 2 * (rows // groups)  # the rows of the first two groups
    want = jax.jit(gemm._xla_scaled_grouped_matmul)(
        jax.tree.map(lambda a: a[:head], x), w, sizes.at[2:].set(0)
    )
    time_bf16(problem, rows, n, k, args)
    for t in tilings:
        make = lambda t=t: jax.jit(
            lambda x, w, tg: fp8_gemm.fp8_grouped_rows_nt(
                x.qvalue, x.scale, w.qvalue, w.scale, tg, out_dtype=jnp.bfloat16, tiling=t
            )
        )
        time_kernel(
            problem,
            f"kernel {t.name}",
            make,
            inputs,
            lambda out: rel_err(out[:head], want),
            2 * rows * n * k,
            args,
            tiling=t.name,
        )
    if fp8_gemm_mgpu.is_hopper():

        def mgpu(x, w, tg):
            sa, sw = fp8_gemm_mgpu.chunk_scales(x.scale, w.scale, rows, n, k)
            return fp8_gemm_mgpu.fp8_grouped_rows_nt_mgpu(
                x.qvalue, w.qvalue, sa, sw, tg, out_dtype=jnp.bfloat16
            )

        time_kernel(
            problem,
            f"kernel {fp8_gemm_mgpu.DEFAULT_MGPU_TILING.name}",
            lambda: jax.jit(mgpu),
            inputs,
            lambda out: rel_err(out[:head], want),
            2 * rows * n * k,
            args,
        )


def weight_grad(problem, rows, groups, k, n, tilings, args):
    """Weight gradient of the experts: dW[g] = x_g^T dy_g from x^T [K, P], dy^T [N, P]."""
    sizes = jnp.full((groups,), rows // groups, jnp.int32)
    tile_group = gemm.row_groups(sizes // TILE_ROWS, rows // TILE_ROWS)
    tile_start = jnp.searchsorted(tile_group, jnp.arange(groups + 1), side="left")
    inputs = [
        (
            quantize(random((k, rows), 2 * s), E4M3, (1, 128)),
            quantize(random((n, rows), 2 * s + 1), E4M3, (1, 128)),
            tile_start,
        )
        for s in range(SETS)
    ]
    a, b, _ = inputs[0]
    head = 2 * (rows // groups)
    first = lambda q: jax.tree.map(lambda v: v[:, : v.shape[1] * head // rows], q)
    want = jax.jit(gemm._xla_scaled_grouped_matmul_tn, static_argnums=3)(
        first(a), first(b), tile_group[: head // TILE_ROWS], 2
    )
    time_bf16(problem, k, n, rows, args)
    for t in tilings:
        make = lambda t=t: jax.jit(
            lambda a, b, ts: fp8_gemm.fp8_grouped_weight_grad_nt(
                a.qvalue, a.scale, b.qvalue, b.scale, ts, out_dtype=jnp.bfloat16, tiling=t
            )
        )
        time_kernel(
            problem,
            f"kernel {t.name}",
            make,
            inputs,
            lambda out: rel_err(out[:2], want),
            2 * rows * n * k,
            args,
            tiling=t.name,
        )


def best_tilings(problem: str, top: int, rows_tile_max: int | None = None) -> list[Fp8Tiling]:
    """The `top` fastest kernel tilings measured on `problem` (block_m <= rows_tile_max)."""
    timed = sorted(
        (r for r in RESULTS if r["problem"] == problem and "tiling" in r and "ms" in r), key=lambda r: r["ms"]
    )
    tilings = [Fp8Tiling.parse(r["tiling"]) for r in timed]
    tilings = [t for t in tilings if rows_tile_max is None or t.block_m <= rows_tile_max]
    return tilings[:top] or [fp8_gemm.DEFAULT_TILING]


def summary() -> None:
    """Per problem: the references, then every kernel, fastest first."""
    print(f"\n{'problem':22s} {'impl':40s} {'ms':>8s} {'TFLOP/s':>8s} {'x bf16':>7s} {'err':>8s}")
    for problem in dict.fromkeys(r["problem"] for r in RESULTS):
        rows = [r for r in RESULTS if r["problem"] == problem]
        bf16 = next(r for r in rows if r["impl"].startswith("bf16"))
        refs = [r for r in rows if "ms" in r and not r["impl"].startswith("kernel")]
        kernels = sorted(
            (r for r in rows if "ms" in r and r["impl"].startswith("kernel")), key=lambda r: r["ms"]
        )
        for r in refs + kernels:
            err = f"{r['rel_err']:8.1e}" if "rel_err" in r else ""
            print(
                f"{problem:22s} {r['impl']:40s} {r['ms']:8.3f} {r['tflops']:8.1f} "
                f"{bf16['ms'] / r['ms']:7.2f} {err}"
            )
        for r in rows:
            if "failed" in r:
                print(f"{problem:22s} {r['impl']:40s} FAILED: {r['failed'][:80]}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (runs on CPU)")
    parser.add_argument("--batches", type=int, default=15, help="timed batches per figure")
    parser.add_argument("--calls", type=int, default=10, help="calls per batch")
    parser.add_argument(
        "--sweep", default=",".join(SWEEP), help="comma-separated tilings for dense 8192^3 (default: SWEEP)"
    )
    parser.add_argument(
        "--step-shapes",
        action="store_true",
        help="only the dense GEMMs of a bench-1b step (STEP_SHAPES): bf16, "
        "XLA per-tensor and the Mosaic GPU kernel",
    )
    parser.add_argument(
        "--top", type=int, default=2, help="how many of the best sweep tilings run on the other problems"
    )
    args = parser.parse_args()
    sweep = [Fp8Tiling.parse(t) for t in args.sweep.split(",") if t.strip()]
    if args.smoke:
        args.batches, args.calls = 2, 1
        big, dense_shapes, sweep = 256, [(256, True)], [*sweep[:2], Fp8Tiling.parse("64x128w4s3g2l")]
        experts, rows, groups = [(256, 128), (128, 256)], 1024, 4
    else:
        big, dense_shapes = 8192, [(4096, True)]
        experts, rows, groups = [(1024, 768), (384, 1024)], 262144, 64
    print(f"device: {jax.devices()[0].device_kind}; interpret: {jax.default_backend() != 'gpu'}")
    start = time.perf_counter()
    if args.step_shapes:
        for name, k, n in STEP_SHAPES:
            for gemm_name, (m_, n_, k_) in [
                ("fwd", (STEP_TOKENS, n, k)),
                ("dgrad", (STEP_TOKENS, k, n)),
                ("wgrad", (k, n, STEP_TOKENS)),
            ]:
                dense(f"{name} {gemm_name} {m_}x{n_}x{k_}", m_, n_, k_, [], args)
        summary()
        return
    sweep_problem = f"dense {big}^3"
    dense(sweep_problem, big, big, big, sweep, args, xla_blockwise=args.smoke, extras=True)
    best = best_tilings(sweep_problem, args.top)
    rows_best = best_tilings(sweep_problem, args.top, rows_tile_max=TILE_ROWS)
    print(f"best tilings: {[t.name for t in best]}; grouped rows: {[t.name for t in rows_best]}", flush=True)
    if not args.smoke:
        for size, xla in dense_shapes:
            dense(f"dense {size}^3", size, size, size, best, args, xla_blockwise=xla)
    for k, n in experts:
        grouped_rows(f"experts {k}->{n}", rows, groups, k, n, rows_best, args)
        weight_grad(f"expert wgrad {k}x{n}", rows, groups, k, n, best, args)
    summary()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "fp8_gemm.json")
        with open(path, "w") as fh:
            json.dump(
                {
                    "device": jax.devices()[0].device_kind,
                    "sweep": [t.name for t in sweep],
                    "results": RESULTS,
                },
                fh,
                indent=1,
            )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
