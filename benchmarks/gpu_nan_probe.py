"""Where a NaN planted in one tile goes through fp8 quantization and the dense fp8 GEMM kernel,
on this backend (the Triton lowering on a GPU, the Pallas interpreter elsewhere).

    python benchmarks/gpu_nan_probe.py [--bad nan|inf]

The operands of `tests/kernels/test_fp8_gemm.py::test_nan_or_inf_in_a_tile_reaches_every_
output_it_feeds`: x [256, 384] quantized per 1 x 128 (a), w [256, 384] per 128 x 128 (b),
bad values at x[5, 300] (a's tile: row 5, chunk 2) and w[130, 7] (b's block: rows 128..255,
chunk 0).  Printed:
  1. the max reduction's NaN semantics here: a plain jnp.max of |x| per tile (the amax before
     `fp8_scaling.abs_max`; XLA:CPU drops the NaN from 64 rows on, XLA:GPU keeps it) against
     `abs_max`, for the two poisoned tiles;
  2. the scales and the fp8 values around each bad value, from `precision.quantize` (XLA) and
     from the fused Pallas quantization kernel (`kernels.fp8_quantize`);
  3. which outputs of `fp8_matmul_nt` come out non-finite (full rows, full columns, the rest)
     for operands quantized with abs_max, with the plain max, and for hand-made operands with
     finite scales and one fp8 NaN each (the kernel's own containment: row 5 and column 130),
     per tiling, and whether the kernel's NaNs are the XLA reference's (`precision.gemm`).
Exits 1 where the kernel disagrees with what its operands imply (listed under FAIL).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from frontier_jax.kernels.fp8_gemm import Fp8Tiling, fp8_matmul_nt
from frontier_jax.kernels.fp8_quantize import quantize_rows_cols
from frontier_jax.kernels.fp8_scaling import abs_max, expand_scale, scale_from_amax, to_fp8
from frontier_jax.precision import gemm
from frontier_jax.precision.quantize import quantize
from frontier_jax.precision.recipe import E4M3

M, N, K = 256, 256, 384
A_AT, B_AT = (5, 300), (130, 7)  # bad value positions in x [M, K] and w [N, K]
TILINGS = ("64x128w4s4g8", "128x128w8s4g8", "64x128w4s3l")
FAILURES: list[str] = []


def data(shape, seed):
    """The test's operands: normal data whose rows span magnitudes 1e-2 .. 1e2."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal(shape) * 10.0 ** rng.uniform(-2, 2, (shape[0], 1)), jnp.float32)


def plain_max_quantize(x, tiles) -> qwix.QArray:
    """`precision.quantize` with the amax a plain jnp.max of |x| per tile (before abs_max)."""
    split = [v for d, t in zip(x.shape, tiles) for v in (d // t, t)]
    amax = jnp.max(jnp.abs(x).reshape(split), axis=(1, 3))
    scale = scale_from_amax(amax, E4M3)
    return qwix.QArray(to_fp8(x, expand_scale(1.0 / scale, x.shape), E4M3), scale)


def spans(idx) -> str:
    """[1, 2, 3, 7] -> '1..3, 7'."""
    idx, out = list(idx), []
    while idx:
        j = 0
        while j + 1 < len(idx) and idx[j + 1] == idx[j] + 1:
            j += 1
        out.append(f"{idx[0]}" if j == 0 else f"{idx[0]}..{idx[j]}")
        idx = idx[j + 1 :]
    return ", ".join(out) or "none"


def describe(bad: np.ndarray) -> str:
    rows, cols = np.flatnonzero(bad.all(1)), np.flatnonzero(bad.all(0))
    rest = bad.copy()
    rest[rows, :] = False
    rest[:, cols] = False
    return (
        f"{bad.sum():6d} non-finite ({100 * bad.mean():.1f}%): full rows [{spans(rows)}], "
        f"full cols [{spans(cols)}], {rest.sum()} elsewhere"
    )


def expect(name: str, got: np.ndarray, want: np.ndarray) -> None:
    ok = np.array_equal(got, want)
    extra = f" (mismatch {np.sum(got != want)}: want {describe(want)})" if not ok else ""
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{extra}", flush=True)
    if not ok:
        FAILURES.append(name)


def fp8_row(q, row, cols) -> str:
    return " ".join(f"{v:+.4g}" for v in np.asarray(q[row, cols].astype(jnp.float32)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bad", choices=("nan", "inf"), default="nan", help="the value planted")
    args = parser.parse_args()
    bad = float(args.bad)
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    x = data((M, K), 3).at[A_AT].set(bad)
    w = data((N, K), 4).at[B_AT].set(bad)

    print("\n1. amax of the poisoned tiles: plain jnp.max(|x|) vs abs_max (max + sum(x * 0))")
    a_tile = x[A_AT[0] : A_AT[0] + 1]  # a's row 5, its three 1 x 128 chunks
    b_tile = w[128:256]  # b's block rows 128..255
    for name, t in (("a row 5 [1, 384]", a_tile), ("b rows 128..255 [128, 384]", b_tile)):
        split = (t.shape[0], 3, 128)
        plain = jax.jit(lambda t: jnp.max(jnp.abs(t).reshape(split), axis=(0, 2)))(t)
        carried = jax.jit(lambda t: abs_max(t.reshape(split), (0, 2)).reshape(3))(t)
        print(f"  {name:28s} per chunk: plain {np.asarray(plain)}  abs_max {np.asarray(carried)}")
    for rows in (4, 64, 256):
        y = jnp.ones((rows, 128), jnp.float32).at[1, 3].set(bad)
        got = np.asarray(jax.jit(lambda y: jnp.max(y, axis=1))(y))[1]
        print(f"  jnp.max over rows of [{rows:3d}, 128] with {args.bad} at [1, 3]: row 1 -> {got}")

    print("\n2. scales and fp8 values around the bad values")
    a, b = quantize(x, E4M3, (1, 128)), quantize(w, E4M3, (128, 128))
    old_a, old_b = plain_max_quantize(x, (1, 128)), plain_max_quantize(w, (128, 128))
    fused, _ = quantize_rows_cols(x, E4M3, cols=False)
    for name, q in (("quantize (abs_max)", a), ("plain-max quantize", old_a), ("fused Pallas kernel", fused)):
        print(
            f"  a {name:20s} scale[5] {np.asarray(q.scale[5])}  q[5, 296:304] {fp8_row(q.qvalue, 5, np.s_[296:304])}"
        )
        print(f"    NaN fp8 values in a: {int(np.isnan(np.asarray(q.qvalue.astype(jnp.float32))).sum())}")
    for name, q in (("quantize (abs_max)", b), ("plain-max quantize", old_b)):
        print(
            f"  b {name:20s} scale {np.asarray(q.scale).tolist()}  q[130, 4:10] {fp8_row(q.qvalue, 130, np.s_[4:10])}"
        )
        print(f"    NaN fp8 values in b: {int(np.isnan(np.asarray(q.qvalue.astype(jnp.float32))).sum())}")

    print("\n3. non-finite outputs of fp8_matmul_nt")
    tile_fed = np.zeros((M, N), bool)
    tile_fed[A_AT[0], :] = True
    tile_fed[:, 128:256] = True
    products = np.zeros((M, N), bool)
    products[A_AT[0], :] = True
    products[:, B_AT[0]] = True
    # the clean operands' finite scales, one fp8 NaN planted in each: the kernel alone
    nan8 = jnp.asarray(np.nan, E4M3)
    clean_a, clean_b = quantize(data((M, K), 3), E4M3, (1, 128)), quantize(data((N, K), 4), E4M3, (128, 128))
    own_a = qwix.QArray(clean_a.qvalue.at[A_AT].set(nan8), clean_a.scale)
    own_b = qwix.QArray(clean_b.qvalue.at[B_AT].set(nan8), clean_b.scale)
    cases = (
        ("abs_max operands (what quantize gives)", a, b, tile_fed),
        ("plain-max operands", old_a, old_b, None),
        ("finite scales + one fp8 NaN each", own_a, own_b, products),
    )
    for name, qa, qb, want in cases:
        ref = np.asarray(gemm._xla_scaled_matmul(qa, qb))
        print(f"  {name}: XLA reference {describe(~np.isfinite(ref))}")
        for tiling in TILINGS:
            got = np.asarray(
                fp8_matmul_nt(qa.qvalue, qa.scale, qb.qvalue, qb.scale, tiling=Fp8Tiling.parse(tiling))
            )
            print(f"    kernel {tiling:14s} {describe(~np.isfinite(got))}")
            expect(f"{name}, {tiling}: kernel NaNs = XLA reference NaNs", np.isnan(got), np.isnan(ref))
            if want is not None:
                expect(
                    f"{name}, {tiling}: non-finite = the outputs the bad tiles feed", ~np.isfinite(got), want
                )
    print(f"\n{'FAIL: ' + '; '.join(FAILURES) if FAILURES else 'all as expected'}")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
