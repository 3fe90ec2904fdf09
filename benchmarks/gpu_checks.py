"""GPU correctness of the kernel-backed implementations against the XLA references.

    python benchmarks/gpu_checks.py                 # every check
    python benchmarks/gpu_checks.py chunk-attention # the named ones (attention, grouped-matmul, model, chunk-attention)

Each check prints ||out - ref|| / ||ref|| (fp32 reference computed from the same bf16 inputs)
and fails (exit 1) above its stated bound:
  * attention: `impl.attention=cudnn` and `tokamax` vs `xla`, causal and with document segment ids,
    forward and input gradients (bf16 operands: bound 2e-2);
  * grouped matmul: `impl.gmm=tokamax` vs `ragged_dot`, forward and gradients (bound 2e-2);
  * a whole bench-1b-shaped layer stack: logits with cudnn + tokamax vs xla + ragged_dot;
  * chunk attention (the cudnn prefill's two flash calls merged by log-sum-exp) vs its XLA
    implementation and vs one masked softmax over prefix and chunk, on ragged rows (bound 2e-2).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model.attention import chunk_attention, dot_product_attention
from frontier_jax.ops.grouped_matmul import grouped_matmul

FAILURES: list[str] = []


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(name: str, out, ref, bound: float) -> None:
    err = rel(out, ref)
    ok = np.isfinite(err) and err <= bound
    print(f"{'ok  ' if ok else 'FAIL'} {name:60s} rel err {err:.2e} (bound {bound:.0e})", flush=True)
    if not ok:
        FAILURES.append(name)


def attention_checks() -> None:
    b, t, h, dqk, dv = 4, 512, 8, 96, 64
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (b, t, h, dqk), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, t, h, dqk), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, t, h, dv), jnp.bfloat16)
    seg = jnp.sort(jax.random.randint(keys[3], (b, t), 1, 4), axis=1)
    for name, segs in (("causal", None), ("causal + segment ids", seg)):

        def f(impl, q, k, v):
            return dot_product_attention(
                q, k, v, scale=dqk**-0.5, impl=impl, q_segment_ids=segs, kv_segment_ids=segs
            )

        loss = lambda impl: lambda q, k, v: jnp.sum(f(impl, q, k, v).astype(jnp.float32) ** 2)
        ref = jax.jit(lambda *a: f("xla", *a))(q, k, v)
        g_ref = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
        for impl in ("cudnn", "tokamax"):
            check(
                f"attention {impl} vs xla, {name}, forward",
                jax.jit(lambda *a: f(impl, *a))(q, k, v),
                ref,
                2e-2,
            )
            g_out = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
            for arg, go, gr in zip("qkv", g_out, g_ref):
                check(f"attention {impl} vs xla, {name}, d{arg}", go, gr, 2e-2)


def grouped_matmul_checks() -> None:
    m, k, n, g = 8192, 1024, 384, 64
    keys = jax.random.split(jax.random.key(1), 3)
    lhs = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
    rhs = jax.random.normal(keys[1], (g, k, n), jnp.bfloat16) * 0.03
    sizes = jnp.bincount(jax.random.randint(keys[2], (m,), 0, g), length=g).astype(jnp.int32)
    f = lambda impl: lambda a, b: grouped_matmul(a, b, sizes, impl=impl, dtype=jnp.bfloat16)
    check(
        "grouped matmul tokamax vs ragged_dot, forward",
        jax.jit(f("tokamax"))(lhs, rhs),
        jax.jit(f("ragged_dot"))(lhs, rhs),
        2e-2,
    )
    loss = lambda impl: lambda a, b: jnp.sum(f(impl)(a, b).astype(jnp.float32) ** 2)
    g_out = jax.jit(jax.grad(loss("tokamax"), argnums=(0, 1)))(lhs, rhs)
    g_ref = jax.jit(jax.grad(loss("ragged_dot"), argnums=(0, 1)))(lhs, rhs)
    check("grouped matmul tokamax vs ragged_dot, d lhs", g_out[0], g_ref[0], 2e-2)
    check("grouped matmul tokamax vs ragged_dot, d rhs", g_out[1], g_ref[1], 2e-2)
    # float64 reference of d rhs_g = lhs_g^T (2 out_g), out_g = lhs_g rhs_g (from the bf16 inputs)
    a, w = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    ends = np.cumsum(np.asarray(sizes))
    d_rhs = np.stack(
        [a[e - n : e].T @ (2 * a[e - n : e] @ w[i]) for i, (e, n) in enumerate(zip(ends, np.asarray(sizes)))]
    )
    check("grouped matmul ragged_dot d rhs vs float64", g_ref[1], d_rhs, 2e-2)
    check("grouped matmul tokamax d rhs vs float64", g_out[1], d_rhs, 2e-2)


def model_check() -> None:
    from flax import nnx

    from frontier_jax.config import load_config
    from frontier_jax.model import build_model
    from frontier_jax.precision import get_policy

    base = ["model.num_layers=3", "model.vocab_size=4096", "model.mtp_depth=0"]
    ids = jax.random.randint(jax.random.key(2), (2, 256), 0, 4096)
    logits = {}
    for name, extra in (
        ("reference", ["impl.attention=xla", "impl.gmm=ragged_dot"]),
        ("kernels", ["impl.attention=cudnn", "impl.gmm=tokamax"]),
    ):
        cfg = load_config("model/bench-1b", base + extra + ["precision.policy=bf16"])
        model = build_model(
            cfg.model, impl=cfg.impl, policy=get_policy(cfg.precision.policy), rngs=nnx.Rngs(0)
        )
        logits[name] = nnx.jit(lambda m, x: m(x))(model, ids)
    check(
        "bench-1b 3-layer logits, cudnn+tokamax vs xla+ragged_dot",
        logits["kernels"],
        logits["reference"],
        3e-2,
    )


def chunk_attention_checks() -> None:
    b, t, s, h, dqk, dv = 4, 512, 1536, 16, 96, 64
    keys = jax.random.split(jax.random.key(3), 5)
    q = jax.random.normal(keys[0], (b, t, h, dqk), jnp.bfloat16)
    new = (
        jax.random.normal(keys[1], (b, t, h, dqk), jnp.bfloat16),
        jax.random.normal(keys[2], (b, t, h, dv), jnp.bfloat16),
    )
    prefix = (
        jax.random.normal(keys[3], (b, s, h, dqk), jnp.bfloat16),
        jax.random.normal(keys[4], (b, s, h, dv), jnp.bfloat16),
    )
    offsets, counts = jnp.array([0, 512, 1024, 700]), jnp.array([512, 512, 300, 512])
    run = lambda impl: jax.jit(
        lambda *a: chunk_attention(
            *a, new_lengths=counts, prefix_lengths=offsets, scale=dqk**-0.5, implementation=impl
        )
    )(q, new, prefix)
    ref = run("xla")
    check("chunk attention cudnn vs its xla implementation", run("cudnn"), ref, 2e-2)
    # one softmax over the row: the chunk's keys written into the prefix at positions o_b..
    rows = jnp.arange(t)[None, :] + offsets[:, None]
    full = [x.at[jnp.arange(b)[:, None], rows].set(y, mode="drop") for x, y in zip(prefix, new)]
    whole = jax.jit(
        lambda q, k, v: dot_product_attention(q, k, v, scale=dqk**-0.5, impl="xla", q_offset=offsets)
    )(q, *full)
    real = (jnp.arange(t)[None, :] < counts[:, None])[:, :, None, None]
    check("chunk attention xla vs one masked softmax", ref, jnp.where(real, whole, 0), 2e-2)


CHECKS = {
    "attention": attention_checks,
    "grouped-matmul": grouped_matmul_checks,
    "model": model_check,
    "chunk-attention": chunk_attention_checks,
}

if __name__ == "__main__":
    print(f"device: {jax.devices()[0].device_kind}")
    for name in sys.argv[1:] or CHECKS:
        CHECKS[name]()
    print("all checks passed" if not FAILURES else f"{len(FAILURES)} FAILED: {FAILURES}")
    sys.exit(1 if FAILURES else 0)
