"""Log-probabilities of given targets under a language-model head, in fp32.

    log p(y | g) = z_y - lse(z),   lse(z) = log sum_v exp(z_v),   z = g W   (W [d, V])

`target_logprobs` reads them off logits [..., V] that are already there (the training loss, the
sampler).  `chunked_target_logprobs` computes them from the final-normed hidden state g [N, d] and
the head W [d, V] without ever forming the [N, V] logits (scoring and post-training over large
vocabularies): the vocabulary is cut into n strided chunks, chunk k holding the columns
v = i n + k (so a W sharded in blocks over V stays sharded in every chunk), and a scan over the
chunks keeps a running maximum m, sum s and argmax a per token:

    m' = max(m, max_c z),   s' = s exp(m - m') + sum_c exp(z_c - m'),   lse = m + log s
    z_y = g . W[:, y] (one gathered column per token),   a = argmax_v z_v (first index on ties)

Its gradient (a custom VJP) scans the chunks again, recomputing z_c = g W_c:

    dz_c = (dlse - dlogp) softmax(z)_c + dlogp [v = y]          (softmax(z)_c = exp(z_c - lse))
    dg = sum_c dz_c W_c^T,   dW_c = g^T dz_c

so forward and backward hold [N, V / n] logits at a time.  Products take operands in the
compute dtype (g's) with fp32 accumulation; the backward rounds dz to that dtype first
(`precision.mixed`'s convention).
"""

from __future__ import annotations

import functools

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


def _chunk_logits(g: jax.Array, w: jax.Array, k: jax.Array, n: int, vocab: int) -> jax.Array:
    """z_c [N, V / n] fp32 of chunk k; columns past the vocabulary (padding) at -inf."""
    z = jnp.einsum("nd,dv->nv", g, w, preferred_element_type=jnp.float32)
    columns = jnp.arange(w.shape[1]) * n + k
    return jnp.where(columns < vocab, z, -jnp.inf)


def _forward(g: jax.Array, kernel: jax.Array, targets: jax.Array, n: int):
    vocab, chunks = kernel.shape[1], _strided(kernel, n)
    tokens = g.shape[0]

    def body(carry, xs):
        m, s, best, arg = carry
        w, k = xs
        z = _chunk_logits(g, w, k, n, vocab)
        m_new = jnp.maximum(m, z.max(-1))
        s = s * jnp.exp(m - m_new) + jnp.exp(z - m_new[:, None]).sum(-1)
        i = jnp.argmax(z, axis=-1)
        local_best, local_arg = jnp.take_along_axis(z, i[:, None], -1)[:, 0], (i * n + k).astype(jnp.int32)
        better = (local_best > best) | ((local_best == best) & (local_arg < arg))
        return (m_new, s, jnp.where(better, local_best, best), jnp.where(better, local_arg, arg)), None

    start = (
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.zeros((tokens,), jnp.float32),
        jnp.full((tokens,), -jnp.inf, jnp.float32),
        jnp.full((tokens,), vocab, jnp.int32),
    )
    (m, s, _, arg), _ = jax.lax.scan(body, start, (chunks, jnp.arange(n)))
    lse = m + jnp.log(s)
    target_logit = jnp.einsum(
        "nd,dn->n", g, jnp.take(kernel, targets, axis=1), preferred_element_type=jnp.float32
    )
    return target_logit - lse, lse, arg


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(g, kernel, targets, n):
    return _forward(g, kernel, targets, n)


def _chunked_fwd(g, kernel, targets, n):
    logp, lse, arg = _forward(g, kernel, targets, n)
    return (logp, lse, arg), (g, kernel, targets, lse)


def _chunked_bwd(n, residuals, cotangents):
    g, kernel, targets, lse = residuals
    d_logp, d_lse, _ = cotangents
    vocab, chunks = kernel.shape[1], _strided(kernel, n)

    def body(dg, xs):
        w, k = xs
        z = _chunk_logits(g, w, k, n, vocab)
        columns = jnp.arange(w.shape[1]) * n + k
        is_target = columns[None, :] == targets[:, None]
        dz = (d_lse - d_logp)[:, None] * jnp.exp(z - lse[:, None]) + jnp.where(
            is_target, d_logp[:, None], 0.0
        )
        dz = dz.astype(g.dtype)
        dg = dg + jnp.einsum("nv,dv->nd", dz, w, preferred_element_type=jnp.float32)
        return dg, jnp.einsum("nd,nv->dv", g, dz, preferred_element_type=jnp.float32).astype(kernel.dtype)

    dg, dw = jax.lax.scan(body, jnp.zeros(g.shape, jnp.float32), (chunks, jnp.arange(n)))
    d, width = kernel.shape[0], dw.shape[-1]
    dkernel = dw.transpose(1, 2, 0).reshape(d, width * n)[:, :vocab]
    return dg.astype(g.dtype), dkernel, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked_target_logprobs(
    g: jax.Array, kernel: jax.Array, targets: jax.Array, *, chunk: int = 8192
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """g [..., d] (compute dtype), kernel W [d, V] (the same dtype), targets [...] int ->
    (log p(target) [...] fp32, lse [...] fp32, argmax_v z_v [...] int32), over strided vocabulary
    chunks of at most `chunk` columns (module docstring); differentiable in g and W."""
    lead = g.shape[:-1]
    n = vocab_chunks(kernel.shape[1], chunk)
    flat = _chunked(g.reshape(-1, g.shape[-1]), kernel, targets.reshape(-1).astype(jnp.int32), n)
    return tuple(x.reshape(lead) for x in flat)
