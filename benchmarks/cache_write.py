"""The prefill chunk's write into the paged latent cache, alone: time per chunk of each way to
store c^KV and k^R of B x T new tokens into the L layers of a cache [L, N_blocks, P, d].

    python benchmarks/cache_write.py                                   # bench-1b shape, GPU
    python benchmarks/cache_write.py --batch 2 --chunk 128 --blocks 9  # CPU smoke run

Each way runs as one jitted program over the L layers (a `lax.fori_loop` carrying the donated
cache, as the model's layer loop does) and is timed over --repeats chunks after a compile run:
  padded-scatter  one scatter of every token row, padding rows sent to the null block (the
                  write used until 2026-12-07; duplicate indices)
  token-scatter   `write_latent`: padding rows dropped, indices unique
Reported: ms per chunk, and the bytes written (B T L (d_c + d_h^R) x itemsize) over that time.
Every way's cache is checked equal to the token scatter's at the real positions first.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.model.latent_cache import (
    NULL_BLOCK,
    LatentCache,
    Pages,
    empty_cache,
    write_latent,
)


def padded_scatter(cache: LatentCache, layer, c_kv, k_rope, positions, pages: Pages) -> LatentCache:
    """The former write: every token row scattered, padding rows into the null block."""
    p = cache.block_size
    slot = jnp.clip(positions // p, 0, pages.block_table.shape[1] - 1)
    block = jnp.where(pages.write, jnp.take_along_axis(pages.block_table, slot, axis=1), NULL_BLOCK)
    offset = jnp.where(pages.write, positions % p, 0)
    return LatentCache(
        cache.c_kv.at[layer, block, offset].set(c_kv.astype(cache.c_kv.dtype)),
        cache.k_rope.at[layer, block, offset].set(k_rope.astype(cache.k_rope.dtype)),
    )


WAYS = {
    "padded-scatter": lambda cache, layer, c, r, positions, pages: padded_scatter(
        cache, layer, c, r, positions, pages
    ),
    "token-scatter": lambda cache, layer, c, r, positions, pages: write_latent(
        cache, layer, c, r, positions, pages
    ),
}


def make_program(write, layers: int):
    """cache, c_kv [L, B, T, d_c], k_rope [L, B, T, d_r], positions, pages -> cache."""

    def program(cache, c_kv, k_rope, positions, pages):
        def body(layer, cache):
            return write(cache, layer, c_kv[layer], k_rope[layer], positions, pages)

        return jax.lax.fori_loop(0, layers, body, cache)

    return jax.jit(program, donate_argnums=(0,))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=0, help="cache blocks per row (0: 2 chunks + 1)")
    parser.add_argument("--kv-rank", type=int, default=256)
    parser.add_argument("--rope-dim", type=int, default=32)
    parser.add_argument(
        "--padding", type=float, default=0.05, help="share of each row's chunk that is padding"
    )
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    b, t, p, layers = args.batch, args.chunk, args.block_size, args.layers
    per_row = args.blocks or 2 * t // p + 1
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    owned = rng.permutation(np.arange(1, b * per_row + 1)).reshape(b, per_row).astype(np.int32)
    start = t  # the second chunk of each prompt: block-aligned, past the first
    positions = jnp.asarray(start + np.tile(np.arange(t), (b, 1)), jnp.int32)
    real = max(1, int(round(t * (1 - args.padding))))
    write = jnp.asarray(np.arange(t)[None, :] < np.r_[real, np.full(b - 1, t)][:, None])
    pages = Pages(jnp.asarray(owned), write)
    c_kv = jnp.asarray(rng.standard_normal((layers, b, t, args.kv_rank)), dtype)
    k_rope = jnp.asarray(rng.standard_normal((layers, b, t, args.rope_dim)), dtype)
    fresh = lambda: empty_cache(layers, b * per_row + 1, p, args.kv_rank, args.rope_dim, dtype)
    written = b * t * layers * (args.kv_rank + args.rope_dim) * dtype.itemsize

    print(
        f"device {jax.devices()[0].device_kind}; L={layers} B={b} T={t} P={p} d_c={args.kv_rank} "
        f"d_r={args.rope_dim} {args.dtype}; row 0 has {t - real} padding tokens"
    )
    reference = None
    mask = np.asarray(write)
    for name, way in WAYS.items():
        program = make_program(way, layers)
        cache = jax.block_until_ready(program(fresh(), c_kv, k_rope, positions, pages))
        rows = np.asarray(owned)[:, start // p :][:, : t // p]
        got = np.asarray(cache.c_kv[:, rows].reshape(layers, b, t, -1), np.float32)
        if reference is None:
            reference = got
        np.testing.assert_array_equal(got[:, mask], reference[:, mask])
        times = []
        for _ in range(args.repeats):
            begin = time.perf_counter()
            cache = jax.block_until_ready(program(cache, c_kv, k_rope, positions, pages))
            times.append(time.perf_counter() - begin)
        ms = 1e3 * float(np.median(times))
        print(f"{name:15s} {ms:9.3f} ms / chunk   {written / ms / 1e6:8.1f} GB/s written")


if __name__ == "__main__":
    main()
