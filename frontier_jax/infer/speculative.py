"""MTP speculative decoding: the model's D MTP modules draft D tokens, one main-model forward
verifies them, the accepted prefix is kept and the rest of the cache rolled back.

A decoding sequence holds tokens t_0 .. t_{L-1}; t_{L-1} was just sampled, positions 0 .. L-2
are in the main cache, with their final-normed hidden states g^0.  One step:
  1. draft: the MTP chain (`Transformer.draft`) over the positions j not yet final in the MTP
     caches (j >= mtp_computed) up to L-2; depth k at j reads g^{k-1}_j and t_{j+k}, the
     chain's own prediction where t_{j+k} is not yet known.  At j = L-2 depth k predicts
     d_k ~ t_{L-1+k}: the drafts d_1 .. d_D (argmax of each depth, a deterministic proposal).
     Depth k's latent at j is final once t_{j+1} .. t_{j+k} are all known: mtp_computed = L - D.
  2. verify: the main model over [t_{L-1}, d_1, .., d_D] at positions L-1 .. L-1+D (absorbed
     decode, T = D+1) -> target distributions p_0 .. p_D (each request's filtered softmax).
  3. accept (speculative sampling with the one-hot proposal q_i = [d_i]): d_i is kept with
     probability min(1, p_{i-1}(d_i) / q_i(d_i)) = p_{i-1}(d_i) while all before it were kept;
     after n kept drafts the next token is drawn from norm(max(0, p_n - q_{n+1})) = p_n without
     d_{n+1} (a rejection) or from p_D (all kept).  Every emitted token is distributed exactly
     as the model's sampling distribution; greedy (temperature 0) keeps d_i iff it is the argmax,
     so the output equals plain greedy decoding.
  4. roll back: the main cache keeps positions <= L-1+n (later entries are masked by position
     and overwritten); the emitted n + 1 tokens extend the sequence.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from frontier_jax.infer.sampling import filter_logits, token_keys
from frontier_jax.infer.scheduler import Request, Scheduler, bucket
from frontier_jax.model.config import ModelConfig
from frontier_jax.model.extend_context import ExtendContext
from frontier_jax.model.latent_cache import Pages
from frontier_jax.parallel.host import fetch


@functools.cache
def make_draft_step(graphdef: nnx.GraphDef, *, absorbed: bool, impl: str = "xla") -> Callable:
    """draft(state, cache, g0, ahead, known, positions, pages, select) -> (drafts [B, D], cache),
    jitted with the cache donated (`Transformer.draft`)."""

    def step(state, cache, g0, ahead, known, positions, pages, select):
        model = nnx.merge(graphdef, state)
        return model.draft(g0, ahead, known, positions, select, cache, ExtendContext(pages, absorbed, impl))

    return jax.jit(step, donate_argnums=(1,))


@jax.jit
def accept(logits, drafts, temperature, top_k, top_p, seeds, counters):
    """The acceptance rule (module docstring, step 3).  logits [B, D+1, V] of the verify
    forward, drafts [B, D], per-row sampling parameters [B], seeds / counters [B] (the step's
    randomness) -> (n kept drafts [B], tokens [B, D+1] whose first n+1 are emitted,
    log p_model of those tokens [B, D+1])."""
    b, t, vocab = logits.shape
    d = t - 1
    z = filter_logits(
        logits.reshape(b * t, vocab), jnp.repeat(temperature, t), jnp.repeat(top_k, t), jnp.repeat(top_p, t)
    ).reshape(b, t, vocab)
    p = jax.nn.softmax(z, axis=-1)
    greedy = temperature == 0
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, D+1]
    keys = token_keys(seeds, counters)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (d,)))(keys)
    p_draft = jnp.take_along_axis(p[:, :d], drafts[..., None], axis=-1)[..., 0]
    kept = jnp.where(greedy[:, None], drafts == best[:, :d], u < p_draft)
    n = jnp.cumprod(kept, axis=1).sum(axis=1).astype(jnp.int32)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    rejected = jnp.take_along_axis(drafts, jnp.minimum(n, d - 1)[:, None], axis=1)[:, 0]
    residual = jnp.where((n < d)[:, None], p_n * (1 - jax.nn.one_hot(rejected, vocab)), p_n)
    drawn = jax.vmap(jax.random.categorical)(
        jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys), jnp.log(residual)
    )
    last = jnp.where(greedy, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0], drawn).astype(jnp.int32)
    tokens = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    tokens = jnp.where(jnp.arange(t)[None] == n[:, None], last[:, None], tokens)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[..., None], axis=-1)[..., 0]
    return n, tokens, logprobs


class MTPDecoder:
    """Runs steps 1-4 for the engine's decoding requests (`Engine` with infer.speculative=mtp)."""

    def __init__(
        self, graphdef: nnx.GraphDef, cfg: ModelConfig, scheduler: Scheduler, prefill_chunk: int, impl: str
    ):
        self.depth, self.hidden_size = cfg.mtp_depth, cfg.hidden_size
        self.scheduler, self.chunk = scheduler, prefill_chunk
        self._catch_up = make_draft_step(graphdef, absorbed=False)
        self._draft = make_draft_step(graphdef, absorbed=True, impl=impl)
        self.stats = {"drafted": 0, "accepted": 0, "verify_forwards": 0}

    def draft(self, state, cache, rows: list[Request]):
        """Step 1 for every row -> (drafts [len(rows), D] numpy, cache).  Windows longer than
        2D (right after a prompt) are first caught up in prefill-sized chunks."""
        window = 2 * self.depth
        while True:
            behind = [r for r in rows if r.length - 1 - r.mtp_computed > window]
            if not behind:
                break
            counts = [min(self.chunk, r.length - 1 - r.mtp_computed - window) for r in behind]
            _, cache = self._run(
                self._catch_up, state, cache, behind, counts, bucket(max(counts), self.chunk)
            )
            for r, c in zip(behind, counts):
                self._advance(r, r.mtp_computed + c)
        counts = [r.length - 1 - r.mtp_computed for r in rows]
        drafts, cache = self._run(self._draft, state, cache, rows, counts, window)
        for r in rows:
            self._advance(r, max(r.length - self.depth, r.mtp_computed))
        return fetch(drafts)[: len(rows)], cache

    @staticmethod
    def _advance(request: Request, mtp_computed: int) -> None:
        request.mtp_computed = mtp_computed
        for position in [p for p in request.hidden if p < mtp_computed]:
            del request.hidden[position]

    def _run(self, step, state, cache, rows: list[Request], counts: list[int], width: int):
        """The MTP chain over positions mtp_computed .. + counts[b] - 1 of each row."""
        starts = [r.mtp_computed for r in rows]
        batch = self.scheduler.batch(
            rows, starts, [[0] * c for c in counts], width, [[c - 1] for c in counts]
        )
        n = batch.ids.shape[0]
        g0 = np.zeros((n, width, self.hidden_size), np.float32)
        ahead = np.zeros((self.depth, n, width), np.int32)
        known = np.zeros((self.depth, n, width), bool)
        for b, (r, start, count) in enumerate(zip(rows, starts, counts)):
            tail = r.tokens_from(start)  # tail[i] = tokens[start + i]
            for t in range(count):
                g0[b, t] = r.hidden[start + t]
                for k in range(1, self.depth + 1):
                    if t + k < len(tail):
                        ahead[k - 1, b, t], known[k - 1, b, t] = tail[t + k], True
        pages = Pages(jnp.asarray(batch.block_table), jnp.asarray(batch.write))
        return step(
            state,
            cache,
            jnp.asarray(g0),
            jnp.asarray(ahead),
            jnp.asarray(known),
            jnp.asarray(batch.positions),
            pages,
            jnp.asarray(batch.select[:, 0]),
        )
