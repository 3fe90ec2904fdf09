"""The model's output side, as a function of its final-normed hidden state g [..., d].

`model.head: lm` reads next-token logits z = g W_out (W_out [d, V]; E^T with tied embeddings)
and log-probabilities of given targets from them; `model.head: scalar` reads one value per
sequence at its last token (`reward.py`).  Objectives receive this object with g (not logits),
so that what they read is computed where they need it: full logits for the pre-training loss,
vocabulary chunks for log-probabilities (`logprobs.py`), values for reward models.
"""

from __future__ import annotations

import jax

from frontier_jax.model.config import Head, ModelConfig
from frontier_jax.model.layers import Embed, LMHead
from frontier_jax.model.logprobs import TokenStats, chunked_target_logprobs, chunked_token_stats
from frontier_jax.model.reward import ScalarHead


def require_lm_head(cfg: ModelConfig, what: str) -> None:
    """Raises ValueError (one line) when `what` needs next-token logits and `cfg` has none."""
    if cfg.head != Head.lm:
        raise ValueError(
            f"{what} needs a language model (model.head=lm), but this model has model.head={cfg.head}: "
            "a scalar head reads values (model.reward), not tokens"
        )


class OutputHead:
    """The head of a `Transformer` (its modules, so gradients reach their parameters)."""

    def __init__(self, cfg: ModelConfig, embed: Embed, lm_head: LMHead | None, score: ScalarHead | None):
        self.cfg, self.embed, self.lm_head, self.score = cfg, embed, lm_head, score

    def logits(self, g: jax.Array) -> jax.Array:
        """g [..., d] -> logits [..., V] fp32."""
        require_lm_head(self.cfg, "logits")
        return self.embed.attend(g) if self.lm_head is None else self.lm_head(g)

    def kernel(self) -> jax.Array:
        """W_out [d, V] in the compute dtype (E^T with tied embeddings)."""
        require_lm_head(self.cfg, "log-probabilities")
        if self.lm_head is None:
            return self.embed.embedding[...].T.astype(self.embed.policy.compute_dtype)
        return self.lm_head.kernel[...].astype(self.lm_head.policy.compute_dtype)

    def target_logprobs(
        self, g: jax.Array, targets: jax.Array, *, chunk: int = 8192
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """g [..., d], targets [...] -> (log p(target), lse, argmax) [...] without forming the
        [..., V] logits (`logprobs.chunked_target_logprobs`, vocabulary chunks of <= `chunk`)."""
        w = self.kernel()
        return chunked_target_logprobs(g.astype(w.dtype), w, targets, chunk=chunk)

    def token_stats(
        self, g: jax.Array, targets: jax.Array, *, chunk: int = 8192, temperature: float = 1.0
    ) -> TokenStats:
        """g [..., d], targets [...] -> log softmax(z / T)[target], lse, argmax and entropy [...]
        of z = g W, without forming the [..., V] logits (`logprobs.chunked_token_stats`)."""
        w = self.kernel()
        return chunked_token_stats(g.astype(w.dtype), w, targets, chunk=chunk, temperature=temperature)

    def segment_values(
        self, g: jax.Array, segment_ids: jax.Array | None, segments: int
    ) -> tuple[jax.Array, jax.Array]:
        """The scalar head's (values [B, S], present [B, S]) at each segment's last token."""
        if self.score is None:
            raise ValueError(f"values need model.head=scalar, but this model has model.head={self.cfg.head}")
        return self.score.segment_values(g, segment_ids, segments)
