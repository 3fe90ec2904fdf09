"""The sampler draws from the filtered softmax: a chi-square test over many seeds against a
float64 numpy reference of temperature / top-k / top-p."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from frontier_jax.infer.sampling import SamplingParams, sample

DRAWS = 20_000


def filtered_softmax(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Reference: probabilities of the filtered distribution (float64)."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z)
    keep = np.zeros(z.shape, bool)
    keep[order[: top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    cumulative = np.cumsum(p[order])
    smallest = np.searchsorted(cumulative, top_p) + 1  # smallest prefix with mass >= top_p
    keep[:] = False
    keep[order[:smallest]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum()


def draw(logits: np.ndarray, params: SamplingParams, seeds: np.ndarray) -> np.ndarray:
    n = len(seeds)
    tokens, _ = sample(
        jnp.asarray(np.broadcast_to(logits, (n, len(logits)))),
        jnp.full((n,), params.temperature, jnp.float32),
        jnp.full((n,), params.top_k, jnp.int32),
        jnp.full((n,), params.top_p, jnp.float32),
        jnp.asarray(seeds, jnp.uint32),
        jnp.zeros((n,), jnp.int32),
    )
    return np.asarray(tokens)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.7),
    ],
    ids=["plain", "top_k", "top_p", "top_k_top_p"],
)
def test_sampled_token_distribution_is_the_filtered_softmax(params):
    logits = np.random.default_rng(0).normal(0, 1.5, 12).astype(np.float32)
    expected = filtered_softmax(logits, params.temperature, params.top_k, params.top_p)
    counts = np.bincount(draw(logits, params, np.arange(DRAWS)), minlength=len(logits))
    assert counts[expected == 0].sum() == 0, "a filtered-out token was drawn"
    kept = expected > 0
    chi2 = ((counts[kept] - DRAWS * expected[kept]) ** 2 / (DRAWS * expected[kept])).sum()
    assert stats.chi2.sf(chi2, kept.sum() - 1) > 1e-3, f"chi2={chi2:.1f} over {kept.sum()} tokens"


def test_greedy_takes_the_argmax_and_seeds_reproduce():
    logits = np.random.default_rng(1).normal(0, 1, 12).astype(np.float32)
    assert (draw(logits, SamplingParams(), np.arange(8)) == logits.argmax()).all()
    params = SamplingParams(temperature=1.0)
    np.testing.assert_array_equal(draw(logits, params, np.arange(64)), draw(logits, params, np.arange(64)))
    assert len(set(draw(logits, params, np.arange(64)).tolist())) > 1
