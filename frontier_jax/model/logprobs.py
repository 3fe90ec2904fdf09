"""Log-probabilities of given targets under a language-model head, in fp32.

    log p(y | g) = z_y - lse(z),   lse(z) = log sum_v exp(z_v),   z = g W   (W [d, V])

`target_logprobs` reads them off logits [..., V] that are already there (the training loss, the
sampler).  At a sampling temperature T every formula below reads z / T in place of z (what a
sampler at T draws from; T = 1 is the model's own distribution).  `chunked_target_logprobs` computes them from the final-normed hidden state g [N, d] and
the head W [d, V] without ever forming the [N, V] logits (scoring and post-training over large
vocabularies): the vocabulary is cut into n strided chunks, chunk k holding the columns
v = i n + k (so a W sharded in blocks over V stays sharded in every chunk), and a scan over the
chunks keeps a running maximum m, sum s, argmax a and the sum u behind the entropy per token:

    m' = max(m, max_c z),   s' = s exp(m - m') + sum_c exp(z_c - m'),   lse = m + log s
    u' = u exp(m - m') + sum_c exp(z_c - m') z_c,   H = -sum_v p_v log p_v = lse - u / s
    z_y = g . W[:, y] (one gathered column per token),   a = argmax_v z_v (first index on ties)

The entropy H is a reported figure: it carries no gradient (the backward ignores its cotangent).

Its gradient (a custom VJP) scans the chunks again, recomputing z_c = g W_c:

    dz_c = (dlse - dlogp) softmax(z)_c + dlogp [v = y]          (softmax(z)_c = exp(z_c - lse))
    dg = sum_c dz_c W_c^T / T,   dW_c = g^T dz_c / T

so forward and backward hold [N, V / n] logits at a time.  Products take operands in the
compute dtype (g's) with fp32 accumulation; the backward rounds dz to that dtype first
(`precision.mixed`'s convention).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


def target_logprobs(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V], targets [...] int -> (log p(target) [...], lse [...]), fp32."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - lse, lse


def vocab_chunks(vocab: int, chunk: int) -> int:
    """n: the number of strided chunks of at most about `chunk` columns (ceil(V / chunk))."""
    return max(1, -(-vocab // chunk))


def _strided(kernel: jax.Array, n: int) -> jax.Array:
    """W [d, V] -> [n, d, ceil(V / n)]: chunk k = columns k, n + k, 2n + k, ... (zeros past V)."""
    d, v = kernel.shape
    width = -(-v // n)
    if width * n != v:
        kernel = jnp.pad(kernel, ((0, 0), (0, width * n - v)))
    return kernel.reshape(d, width, n).transpose(2, 0, 1)


def _chunk_logits(
    g: jax.Array, w: jax.Array, k: jax.Array, n: int, vocab: int, temperature: float
) -> jax.Array:
    """z_c / T [N, V / n] fp32 of chunk k; columns past the vocabulary (padding) at -inf."""
    z = jnp.einsum("nd,dv->nv", g, w, preferred_element_type=jnp.float32)
    if temperature != 1.0:
        z = z / temperature
    columns = jnp.arange(w.shape[1]) * n + k
    return jnp.where(columns < vocab, z, -jnp.inf)


def _forward(g: jax.Array, kernel: jax.Array, targets: jax.Array, n: int, temperature: float):
    vocab, chunks = kernel.shape[1], _strided(kernel, n)
    tokens = g.shape[0]

    def body(carry, xs):
        m, s, u, best, arg = carry
        w, k = xs
        z = _chunk_logits(g, w, k, n, vocab, temperature)
        m_new = jnp.maximum(m, z.max(-1))
        decay, e = jnp.exp(m - m_new), jnp.exp(z - m_new[:, None])
        s = s * decay + e.sum(-1)
        u = u * decay + jnp.where(e > 0, e * z, 0.0).sum(-1)  # (padding columns: 0 * -inf)
        i = jnp.argmax(z, axis=-1)
        local_best, local_arg = jnp.take_along_axis(z, i[:, None], -1)[:, 0], (i * n + k).astype(jnp.int32)
        better = (local_best > best) | ((local_best == best) & (local_arg < arg))
        return (m_new, s, u, jnp.where(better, local_best, best), jnp.where(better, local_arg, arg)), None

    start = (
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.full((tokens,), vocab, jnp.int32),
    )
    (m, s, u, _, arg), _ = jax.lax.scan(body, start, (chunks, jnp.arange(n)))
    lse = m + jnp.log(s)
    target_logit = jnp.einsum(
        "nd,dn->n", g, jnp.take(kernel, targets, axis=1), preferred_element_type=jnp.float32
    )
    if temperature != 1.0:
        target_logit = target_logit / temperature
    return target_logit - lse, lse, arg, lse - u / s


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked(g, kernel, targets, n, temperature):
    return _forward(g, kernel, targets, n, temperature)


def _chunked_fwd(g, kernel, targets, n, temperature):
    out = _forward(g, kernel, targets, n, temperature)
    return out, (g, kernel, targets, out[1])


def _chunked_bwd(n, temperature, residuals, cotangents):
    g, kernel, targets, lse = residuals
    d_logp, d_lse, _, _ = cotangents  # the entropy carries no gradient (module docstring)
    vocab, chunks = kernel.shape[1], _strided(kernel, n)

    def body(dg, xs):
        w, k = xs
        z = _chunk_logits(g, w, k, n, vocab, temperature)
        columns = jnp.arange(w.shape[1]) * n + k
        is_target = columns[None, :] == targets[:, None]
        dz = (d_lse - d_logp)[:, None] * jnp.exp(z - lse[:, None]) + jnp.where(
            is_target, d_logp[:, None], 0.0
        )
        dz = (dz / temperature if temperature != 1.0 else dz).astype(g.dtype)
        dg = dg + jnp.einsum("nv,dv->nd", dz, w, preferred_element_type=jnp.float32)
        return dg, jnp.einsum("nd,nv->dv", g, dz, preferred_element_type=jnp.float32).astype(kernel.dtype)

    dg, dw = jax.lax.scan(body, jnp.zeros(g.shape, jnp.float32), (chunks, jnp.arange(n)))
    d, width = kernel.shape[0], dw.shape[-1]
    dkernel = dw.transpose(1, 2, 0).reshape(d, width * n)[:, :vocab]
    return dg.astype(g.dtype), dkernel, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


class TokenStats(NamedTuple):
    """Per-token figures of `chunked_token_stats`, each [...] (the tokens' shape)."""

    logprob: jax.Array  # log softmax(z / T)[y], fp32
    lse: jax.Array  # log sum_v exp(z_v / T), fp32
    argmax: jax.Array  # argmax_v z_v, int32
    entropy: jax.Array  # -sum_v p_v log p_v of p = softmax(z / T), fp32, no gradient


def chunked_token_stats(
    g: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk: int = 8192, temperature: float = 1.0
) -> TokenStats:
    """g [..., d] (compute dtype), kernel W [d, V] (the same dtype), targets [...] int -> the
    `TokenStats` of the distribution softmax(g W / T), over strided vocabulary chunks of at most
    `chunk` columns (module docstring); log p and lse differentiable in g and W."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (log-probabilities of softmax(z / T))")
    lead = g.shape[:-1]
    n = vocab_chunks(kernel.shape[1], chunk)
    flat = _chunked(
        g.reshape(-1, g.shape[-1]), kernel, targets.reshape(-1).astype(jnp.int32), n, float(temperature)
    )
    return TokenStats(*(x.reshape(lead) for x in flat))


def chunked_target_logprobs(
    g: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk: int = 8192, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(log p(target) [...] fp32, lse [...] fp32, argmax_v z_v [...] int32) of
    `chunked_token_stats`."""
    stats = chunked_token_stats(g, kernel, targets, chunk=chunk, temperature=temperature)
    return stats.logprob, stats.lse, stats.argmax
