"""The tiny model, tokenizer and cache layout that the engine-hook tests share: one model config
and one layout, so one set of compiled step programs serves them all."""

import numpy as np
from flax import nnx

from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.infer import InferConfig
from frontier_jax.model import Transformer
from tests.model import common

INFER = InferConfig(block_size=8, max_seqs=4, max_len=48, prefill_chunk=6)
TOKENIZER = byte_tokenizer()


def config():
    """A tiny MoE model over the byte tokenizer's 266 ids."""
    return common.tiny_config(vocab_size=TOKENIZER.vocab_size)


def model(seed: int = 3) -> Transformer:
    return common.build(lambda: Transformer(config(), rngs=nnx.Rngs(0)), seed=seed)


def prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Random byte prompts (ids < 256) of the given lengths."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]
