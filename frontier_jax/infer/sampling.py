"""Per-request sampling parameters and the batched sampler (one jitted program per batch size).

For logits z [V] of one request with temperature tau, top_k k, top_p p:
    z' = z / tau;  top-k keeps the k largest z' (k = 0: all);  top-p then keeps the smallest
    set of most likely tokens whose probability (softmax over what top-k kept) reaches p;
    the token is drawn from softmax(z') renormalised over the kept set.
Tokens tied with the last kept one are kept too.  tau = 0 is greedy: argmax z.
Randomness: token n of a request uses key fold_in(key(seed), n), so a request's samples do not
depend on which other requests share its batch.

min_tokens: while a request has generated fewer than min_tokens tokens, its stop token ids (eos
and stop_token_ids) get z = -inf before filtering, so neither sampling nor greedy picks them.
Reported log-probs are always the raw model's: log softmax(z) at temperature 1, unfiltered and
unbanned; `top_logprobs` gives the k most likely tokens of that distribution (k <= MAX_LOGPROBS).
`tempered_logprobs` gives log softmax(z / tau)[token] (tau = 1 for greedy rows), unfiltered and
unbanned: the log-probability a policy-gradient trainer computes for a token sampled at tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from frontier_jax.model.logprobs import target_logprobs

MAX_LOGPROBS = 20  # most alternatives per token that `logprobs` / `prompt_logprobs` may ask for
MAX_BANNED = 8  # most stop token ids a min_tokens request may have (eos included)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is continued.  max_new_tokens: tokens to generate at most;
    temperature: 0 = greedy; top_k: 0 = off; top_p in (0, 1] (1 = off); seed: None = derived
    from the request's index; stop_token_ids / stop: token ids and strings that end the
    generation (the tokenizer's eos is added unless ignore_eos); n: samples of the prompt,
    requests of consecutive ids that share its prefill (`Engine.submit`), sample j drawing with
    seed + j.  min_tokens: tokens generated before eos and stop_token_ids may end the request
    (they are banned until then; stop strings apply throughout); logprobs: the k most likely
    tokens (ids and log-probs) to report with each generated token, 0..MAX_LOGPROBS;
    prompt_logprobs: None, or k to report log p of every prompt token after the first given the
    ones before it, with its k most likely alternatives.  Opt-in records for post-training
    (`Completion`): record_routing, the experts each MoE layer routed each token to
    (`Completion.routed_experts`, for routing replay in the trainer); tempered_logprobs,
    log softmax(z / temperature)[token] of each generated token (`Completion.tempered_logprobs`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    min_tokens: int = 0
    logprobs: int = 0
    prompt_logprobs: int | None = None
    record_routing: bool = False
    tempered_logprobs: bool = False

    def check(self) -> None:
        """Raises ValueError naming the first invalid field and its allowed range."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0: greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0: off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1: off)")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and not (
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32
        ):
            raise ValueError(f"seed={self.seed!r} must be an integer in [0, 2^32)")
        if not isinstance(self.n, int) or self.n <= 0:
            raise ValueError(f"n={self.n!r} must be a positive integer (samples of the prompt)")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name}={value!r} must be an integer in [0, {MAX_LOGPROBS}]")
        for name in ("record_routing", "tempered_logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ban(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """logits [B, V] with -inf at each row's banned ids (banned [B, S] int, -1: none)."""
    rows = jnp.arange(logits.shape[0])[:, None]
    hit = jnp.zeros(logits.shape, bool).at[rows, jnp.maximum(banned, 0)].max(banned >= 0)
    return jnp.where(hit, -jnp.inf, logits)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits [B, V] -> z' [B, V] fp32 with -inf outside each row's top-k / top-p set (module
    docstring); temperature [B] (0 rows are scaled by 1), top_k [B] int, top_p [B]."""
    tau = jnp.where(temperature > 0, temperature, 1.0)
    z = logits.astype(jnp.float32) / tau[:, None]
    vocab = z.shape[-1]
    desc = -jnp.sort(-z, axis=-1)
    kth = jnp.take_along_axis(desc, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    z = jnp.where((top_k[:, None] > 0) & (z < kth), -jnp.inf, z)
    desc = -jnp.sort(-z, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    kept = jnp.where(before < top_p[:, None], desc, jnp.inf)
    return jnp.where(z < kept.min(axis=-1, keepdims=True), -jnp.inf, z)


def token_keys(seeds: jax.Array, counters: jax.Array) -> jax.Array:
    """Keys fold_in(key(seed_b), n_b) [B] for the n_b-th sampled token of each row."""
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counters)


@jax.jit
def sample(logits, temperature, top_k, top_p, seeds, counters, banned=None) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] -> (tokens [B] int32, log p_model(token) [B]: the unfiltered log-softmax
    at temperature 1); banned [B, S] (-1: none): ids no row may pick (min_tokens)."""
    allowed = logits if banned is None else ban(logits.astype(jnp.float32), banned)
    z = filter_logits(allowed, temperature, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(token_keys(seeds, counters), z)
    tokens = jnp.where(temperature > 0, drawn, jnp.argmax(allowed, axis=-1)).astype(jnp.int32)
    return tokens, target_logprobs(logits, tokens)[0]


@jax.jit
def tempered_logprobs(logits: jax.Array, temperature: jax.Array, tokens: jax.Array) -> jax.Array:
    """logits [B, V], temperature [B] (0: greedy, scaled by 1), tokens [B] -> log softmax(z / tau)
    [B] at each row's token (unfiltered, unbanned), fp32."""
    tau = jnp.where(temperature > 0, temperature, 1.0)
    return target_logprobs(logits.astype(jnp.float32) / tau[:, None], tokens)[0]


@jax.jit
def top_logprobs(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] -> the MAX_LOGPROBS most likely tokens of log softmax(logits) (temperature
    1, unfiltered): (ids [..., k] int32, log-probs [..., k]), most likely first; k = min(MAX_LOGPROBS, V)."""
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    values, ids = jax.lax.top_k(logprobs, min(MAX_LOGPROBS, logprobs.shape[-1]))
    return ids.astype(jnp.int32), values


@jax.jit
def prompt_scores(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """logits [B, T, V] of prompt positions, targets [B, T] (the next prompt token of each) ->
    (log p(target) [B, T], `top_logprobs` ids and log-probs [B, T, min(MAX_LOGPROBS, V)])."""
    ids, values = top_logprobs(logits)
    return target_logprobs(logits, targets)[0], ids, values
