"""One MoE layer of `bench-1b` on one GPU: the grouped-GEMM paths side by side, in one run.

    python benchmarks/moe_layer.py [--batch 16 --seq 2048] [--sweep] [--smoke] [--json FILE]

Sections (forward + backward everywhere, bf16 operands, fp32 accumulation):
  1. (--sweep) Pallas kernel tilings: each of our three kernels (forward, input gradient,
     per-expert weight gradient) for the two expert shapes over a few tilings, and the fastest
     tiling per kernel (the defaults in `kernels/grouped_gemm.py` come from this).
  2. Correctness on the device: our expert compute vs `jax.lax.ragged_dot` upcast to fp32
     (||ours - ref|| / ||ref|| for y, dx and each dW) at a reduced size.
  3. Expert compute (gate/up, SwiGLU, down over the routed rows of B x T tokens, top-K of E):
     ours (Pallas, tile-aligned rows), tokamax ragged_dot (if installed), capacity-padded
     batched einsum (factor 1.25), the dense-equivalent layer (one weight for all rows: the
     practical floor), and `ragged_dot` / naive all-experts masked at 1/8 of the rows.
  3b. The row moves with the expert compute (token rows [B T, d] to the gate-weighted token
     outputs): XLA gathers into the sorted buffer and back, around our kernels
     (`impl.gmm_gather=xla`), vs the rows gathered inside the gate/up kernel's loads
     (`dispatch`), vs that and the down kernel storing its rows in token order, its backward
     reading the gate-scaled token gradients (`fused`); the gradients' differences to `xla`.
  4. The whole MoE layer module (router, dispatch, experts, shared expert, combine): dropless
     with our kernel (each `impl.gmm_gather`) vs capacity dispatch.
TFLOP/s counts useful FLOPs only: 3 matmuls x 2 x rows x d x f, times 3 for forward+backward.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.kernels import grouped_gemm as gg
from frontier_jax.model.moe import MoE
from frontier_jax.ops.expert_compute import (
    collect,
    combine,
    combine_scatter,
    dispatch,
    dispatch_gather,
    dropless_slots,
    swiglu_batched,
    swiglu_grouped,
)
from frontier_jax.precision import get_policy

ROW_TILINGS = [
    gg.RowTiling(256, 64, 8, 3),
    gg.RowTiling(256, 64, 8, 4),
    gg.RowTiling(128, 64, 8, 3),
    gg.RowTiling(256, 32, 8, 5),
    gg.RowTiling(128, 128, 8, 3),
]
WEIGHT_TILINGS = [
    gg.WeightTiling(128, 128, 128, 8, 3),
    gg.WeightTiling(128, 256, 64, 8, 3),
    gg.WeightTiling(128, 256, 64, 8, 4),
    gg.WeightTiling(256, 128, 64, 8, 4),
    gg.WeightTiling(128, 128, 64, 4, 4),
    gg.WeightTiling(128, 128, 64, 8, 5),
]


def time_ms(fn, *args, iters: int = 20) -> float:
    """Median wall time of fn(*args) in ms over `iters` calls, after compile and warm-up."""
    jax.block_until_ready(fn(*args))
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def routed_experts(rng, tokens: int, experts: int, k: int) -> np.ndarray:
    """Uniform random top-k routing: the chosen experts [tokens K], token-major."""
    return np.argsort(rng.random((tokens, experts)), axis=1)[:, :k].reshape(-1)


def routed_sizes(rng, tokens: int, experts: int, k: int) -> np.ndarray:
    """Assignments per expert for uniform random top-k routing."""
    return np.bincount(routed_experts(rng, tokens, experts, k), minlength=experts)


def aligned_layout(sizes: np.ndarray) -> tuple[jax.Array, int]:
    """Group sizes padded to the kernel's row tile, and the static row count."""
    padded = -(-sizes // gg.TILE_ROWS) * gg.TILE_ROWS
    return jnp.asarray(padded, jnp.int32), gg.padded_rows_bound(int(sizes.sum()), len(sizes), gg.TILE_ROWS)


def fwd_bwd(swiglu):
    """f(x, wg, wu, wd, dy) -> (dx, dwg, dwu, dwd) of sum(swiglu(x, wg, wu, wd) * dy)."""

    def loss(x, wg, wu, wd, dy):
        return jnp.sum(swiglu(x, wg, wu, wd).astype(jnp.float32) * dy)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def swiglu_fwd_bwd(gmm):
    """fwd_bwd of SwiGLU built from a grouped matmul gmm(a, w)."""
    return fwd_bwd(lambda x, wg, wu, wd: gmm(jax.nn.silu(gmm(x, wg)) * gmm(x, wu), wd))


def ours_fwd_bwd(sizes):
    """The model's own expert SwiGLU (gate/up fused) with the Pallas kernel, default tilings."""
    return fwd_bwd(
        lambda x, wg, wu, wd: swiglu_grouped(x, sizes, wg, wu, wd, impl="pallas", dtype=jnp.bfloat16)
    )


def sweep_kernels(rng, rows, sizes_aligned, d, f, e, iters, report):
    """Section 1: time every tiling of each kernel; returns the best Tilings."""
    tile_group, tile_start = gg.tile_groups(sizes_aligned, rows // gg.TILE_ROWS)
    times = {}  # (kernel, tiling) -> {shape: ms}
    for name, c, o in (("gate/up", d, 2 * f), ("down", f, d)):  # gate and up run fused
        x = jnp.asarray(rng.standard_normal((rows, c)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((e, c, o)) * 0.03, jnp.bfloat16)
        dy = jnp.asarray(rng.standard_normal((rows, o)), jnp.bfloat16)
        flops = 2.0 * int(sizes_aligned.sum()) * c * o
        cases = [
            (
                "forward",
                t,
                jax.jit(lambda x, w, tg, t=t: gg._row_matmul(x, w, tg, contract_last=False, tiling=t)),
                (x, w, tile_group),
            )
            for t in ROW_TILINGS
        ]
        cases += [
            (
                "input_grad",
                t,
                jax.jit(lambda dy, w, tg, t=t: gg._row_matmul(dy, w, tg, contract_last=True, tiling=t)),
                (dy, w, tile_group),
            )
            for t in ROW_TILINGS
        ]
        cases += [
            (
                "weight_grad",
                t,
                jax.jit(lambda x, dy, ts, t=t: gg._weight_grad(x, dy, ts, tiling=t)),
                (x, dy, tile_start),
            )
            for t in WEIGHT_TILINGS
        ]
        for kernel, tiling, fn, args in cases:
            try:
                ms = time_ms(fn, *args, iters=iters)
            except Exception as err:  # a tiling the compiler rejects (e.g. shared memory)
                report(f"  {name:8s} {kernel:12s} {tiling}: failed ({type(err).__name__})")
                continue
            report(
                f"  {name:8s} {kernel:12s} {tiling}: {ms:7.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s",
                {
                    "section": "kernels",
                    "shape": name,
                    "kernel": kernel,
                    "tiling": str(tiling),
                    "ms": ms,
                    "tflops": flops / ms / 1e9,
                },
            )
            times.setdefault((kernel, tiling), {})[name] = ms
    # one tiling per kernel for both shapes: the least summed time among those that ran on both
    chosen = {}
    for (kernel, tiling), per_shape in times.items():
        total = sum(per_shape.values()) if len(per_shape) == 2 else math.inf
        if kernel not in chosen or total < chosen[kernel][0]:
            chosen[kernel] = (total, tiling)
    return gg.Tilings(chosen["forward"][1], chosen["input_grad"][1], chosen["weight_grad"][1])


class Reporter:
    def __init__(self):
        self.rows = []

    def __call__(self, line: str, row: dict | None = None):
        print(line, flush=True)
        if row is not None:
            self.rows.append(row)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="model/bench-1b")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time the kernel tilings first")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
    parser.add_argument("--json", help="write all figures here")
    args = parser.parse_intermixed_args()
    overrides = (
        [
            "model.hidden_size=64",
            "model.moe_ffn_dim=32",
            "model.n_routed_experts=8",
            "model.num_experts_per_tok=2",
            "model.n_group=4",
            "model.topk_group=2",
            "model.num_heads=2",
        ]
        if args.smoke
        else []
    )
    cfg = load_config(args.config, overrides).model
    tokens = 256 if args.smoke else args.batch * args.seq
    iters = 2 if args.smoke else args.iters
    d, f, e, k = cfg.hidden_size, cfg.moe_ffn_dim, cfg.n_routed_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(0)
    report = Reporter()
    print(f"device {jax.devices()[0].device_kind}; {tokens} tokens, E {e}, top-{k}, d {d}, f {f}")

    sizes = routed_sizes(rng, tokens, e, k)
    assignments = int(sizes.sum())
    sizes_aligned, rows = aligned_layout(sizes)
    flops = lambda n: 3 * 3 * 2.0 * n * d * f  # fwd + bwd, three matmuls

    if args.sweep:
        report("1. Pallas kernel tilings")
        fastest = sweep_kernels(rng, rows, sizes_aligned, d, f, e, iters, report)
        report(f"   fastest: {fastest}\n   (the model runs gg.DEFAULT_TILINGS = {gg.DEFAULT_TILINGS})")

    def weights(scale=0.03):
        return [
            jnp.asarray(rng.standard_normal(s) * scale, jnp.bfloat16)
            for s in ((e, d, f), (e, d, f), (e, f, d))
        ]

    wg, wu, wd = weights()
    ours = ours_fwd_bwd(sizes_aligned)

    report("2. correctness vs ragged_dot in fp32 (1/8 of the rows)")
    small_sizes = routed_sizes(rng, tokens // 8, e, k)
    small_aligned, small_rows = aligned_layout(small_sizes)
    slot, _ = dropless_slots(jnp.asarray(np.repeat(np.arange(e), small_sizes), jnp.int32), e, gg.TILE_ROWS)
    packed = jnp.asarray(rng.standard_normal((int(small_sizes.sum()), d)), jnp.bfloat16)
    x_aligned = jnp.zeros((small_rows, d), jnp.bfloat16).at[slot].set(packed)
    dy_packed = jnp.asarray(rng.standard_normal((int(small_sizes.sum()), d)), jnp.float32)
    dy_aligned = jnp.zeros((small_rows, d), jnp.float32).at[slot].set(dy_packed)
    small_ours = ours_fwd_bwd(small_aligned)
    ref = swiglu_fwd_bwd(
        lambda a, w: jax.lax.ragged_dot(
            a.astype(jnp.float32), w.astype(jnp.float32), jnp.asarray(small_sizes, jnp.int32)
        )
    )
    got = small_ours(x_aligned, wg, wu, wd, dy_aligned)
    want = ref(packed, wg, wu, wd, dy_packed)
    for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down"), got, want):
        a = a[slot] if name == "dx" else a
        report(
            f"   {name:8s} rel. error {rel(a, b):.2e}", {"section": "check", "name": name, "rel": rel(a, b)}
        )

    report("3. expert compute, forward + backward")
    x = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    dy = jnp.asarray(rng.standard_normal((rows, d)), jnp.float32)

    def row(name, ms, n):
        report(
            f"   {name:44s} {ms:8.3f} ms  {flops(n) / ms / 1e9:6.1f} TFLOP/s  "
            f"{n / k / ms * 1e3:12,.0f} tokens/s",
            {"section": "expert_compute", "path": name, "ms": ms, "tflops": flops(n) / ms / 1e9, "rows": n},
        )
        return ms

    results = {
        "ours": row(
            "ours: Pallas grouped GEMM (tile-aligned)",
            time_ms(ours, x, wg, wu, wd, dy, iters=iters),
            assignments,
        )
    }
    packed_x, packed_dy = x[:assignments], dy[:assignments]
    try:
        import tokamax

        tok = swiglu_fwd_bwd(
            lambda a, w: tokamax.ragged_dot(
                a, w, jnp.asarray(sizes, jnp.int32), preferred_element_type=jnp.bfloat16
            )
        )
        row(
            "tokamax.ragged_dot (Mosaic GPU)",
            time_ms(tok, packed_x, wg, wu, wd, packed_dy, iters=iters),
            assignments,
        )
    except ImportError:
        report("   tokamax not installed: skipped")
    capacity = math.ceil(1.25 * assignments / e)
    cap = jax.jit(
        jax.grad(
            lambda xb, wg, wu, wd, dy: jnp.sum(
                swiglu_batched(xb, wg, wu, wd, dtype=jnp.bfloat16).astype(jnp.float32) * dy
            ),
            argnums=(0, 1, 2, 3),
        )
    )
    xb = jnp.asarray(rng.standard_normal((e, capacity, d)), jnp.bfloat16)
    dyb = jnp.asarray(rng.standard_normal((e, capacity, d)), jnp.float32)
    row("capacity batched einsum (factor 1.25)", time_ms(cap, xb, wg, wu, wd, dyb, iters=iters), assignments)
    dense = swiglu_fwd_bwd(lambda a, w: jnp.dot(a, w[0]))  # cuBLAS: bf16 in/out, fp32 accumulation
    results["dense"] = row(
        "dense-equivalent (one weight, same rows)",
        time_ms(dense, packed_x, wg, wu, wd, packed_dy, iters=iters),
        assignments,
    )
    small = jnp.asarray(routed_sizes(rng, tokens // 8, e, k), jnp.int32)
    n_small = int(small.sum())
    rd = swiglu_fwd_bwd(lambda a, w: jax.lax.ragged_dot(a, w, small))
    try:
        row(
            "jax.lax.ragged_dot at 1/8 rows",
            time_ms(rd, x[:n_small], wg, wu, wd, dy[:n_small], iters=iters),
            n_small,
        )
    except Exception as err:  # out of memory on GPU images that pad it to dense
        report(f"   jax.lax.ragged_dot at 1/8 rows: failed ({type(err).__name__})")
    group_of_row = jnp.asarray(np.repeat(np.arange(e), np.asarray(small)), jnp.int32)

    def naive_gmm(a, w):
        mask = jax.nn.one_hot(group_of_row, e, dtype=a.dtype)  # [rows, E]
        return jnp.einsum("re,rc,eco->ro", mask, a, w)

    try:
        row(
            "naive all-experts masked at 1/8 rows",
            time_ms(swiglu_fwd_bwd(naive_gmm), x[:n_small], wg, wu, wd, dy[:n_small], iters=iters),
            n_small,
        )
    except Exception as err:
        report(f"   naive masked at 1/8 rows: failed ({type(err).__name__})")
    report(f"   ours / dense-equivalent = {results['ours'] / results['dense']:.2f}x the time")

    report("3b. row moves with the expert compute, token rows [B T, d] to token outputs, forward + backward")
    slot, sizes_routed = dropless_slots(jnp.asarray(routed_experts(rng, tokens, e, k)), e, gg.TILE_ROWS)
    tokens_x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.bfloat16)
    gates = jnp.asarray(rng.random((tokens, k)), jnp.float32)
    tokens_dy = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
    swiglu = functools.partial(swiglu_grouped, impl="pallas", dtype=jnp.bfloat16)
    gather = dispatch_gather(slot, tokens, rows)
    collect_combine = lambda out, g: combine(collect(out, slot), g)
    move_paths = {  # impl.gmm_gather: which row moves run inside the kernels
        "xla": lambda x, wg, wu, wd, g: collect_combine(
            swiglu(dispatch(x, slot, rows), sizes_routed, wg, wu, wd), g
        ),
        "dispatch": lambda x, wg, wu, wd, g: collect_combine(
            swiglu(x, sizes_routed, wg, wu, wd, gather=gather), g
        ),
        "fused": lambda x, wg, wu, wd, g: swiglu(
            x, sizes_routed, wg, wu, wd, gather=gather, combine=combine_scatter(slot, g, rows)
        ),
    }

    def moves_fwd_bwd(path):
        """(dx, dW_gate, dW_up, dW_down, d_gates) of sum(path(x, W..., gates) * dy)."""
        loss = lambda x, wg, wu, wd, g, dy: jnp.sum(path(x, wg, wu, wd, g).astype(jnp.float32) * dy)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))

    moved = {}
    for name, path in move_paths.items():
        moved[name] = row(
            f"impl.gmm_gather={name}",
            time_ms(moves_fwd_bwd(path), tokens_x, wg, wu, wd, gates, tokens_dy, iters=iters),
            assignments,
        )
    grads = {
        name: moves_fwd_bwd(path)(tokens_x, wg, wu, wd, gates, tokens_dy) for name, path in move_paths.items()
    }
    for mode in ("dispatch", "fused"):
        for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down", "d_gates"), grads[mode], grads["xla"]):
            report(
                f"   {mode} vs xla {name:8s} rel. difference {rel(a, b):.2e}",
                {"section": "gather_check", "path": mode, "name": name, "rel": rel(a, b)},
            )
        report(f"   {mode} / xla = {moved[mode] / moved['xla']:.3f}x the time")

    report("4. whole MoE layer (router, dispatch, experts, shared expert, combine), forward + backward")
    xin = jnp.asarray(rng.standard_normal((1, tokens, d)), jnp.bfloat16)
    mask = jnp.ones((1, tokens), jnp.int32)
    for label, dispatch_overrides in (
        ("dropless, Pallas kernel", ["impl.moe_dispatch=dropless", "impl.gmm=pallas"]),
        (
            "dropless, Pallas kernel, dispatch gather in it",
            ["impl.moe_dispatch=dropless", "impl.gmm=pallas", "impl.gmm_gather=dispatch"],
        ),
        (
            "dropless, Pallas kernel, both row moves in it",
            ["impl.moe_dispatch=dropless", "impl.gmm=pallas", "impl.gmm_gather=fused"],
        ),
        ("capacity 1.25, batched einsum", ["impl.moe_dispatch=capacity"]),
    ):
        layer_cfg = load_config(args.config, overrides + dispatch_overrides)
        moe = MoE(layer_cfg.model, policy=get_policy("bf16"), impl=layer_cfg.impl, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(moe)

        def loss(params, x):
            y, stats = nnx.merge(graphdef, params)(x, mask)
            return jnp.sum(y.astype(jnp.float32) ** 2) * 1e-6 + stats.balance_loss

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        ms = time_ms(step, params, xin, iters=iters)
        report(
            f"   {label:48s} {ms:8.3f} ms  {tokens / ms * 1e3:12,.0f} tokens/s",
            {"section": "layer", "path": label, "ms": ms, "tokens_per_s": tokens / ms * 1e3},
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": jax.devices()[0].device_kind,
                    "tokens": tokens,
                    "tilings": str(gg.DEFAULT_TILINGS),
                    "rows": report.rows,
                },
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
