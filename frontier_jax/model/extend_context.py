"""What a step tells every layer that extends cached sequences: one small context instead of
the same keyword arguments threaded through each `extend`.

    ExtendContext(pages, absorbed, attention)

pages      where the step's tokens live in the paged latent cache (`latent_cache.Pages`: block
           table [B, M], write [B, T] marking the real tokens, which are stored and counted);
absorbed   the absorbed MLA path (decode steps, memory-bound) instead of the expanded one
           (prefill chunks, compute-bound), see `mla.py`;
attention  the absorbed path's attention core (`infer.decode_attention_impl`: xla | pallas).

Statistics flow back the other way: `Transformer.extend` returns the experts each MoE layer
routed every token to (`Extended.experts`), from which the engine counts expert loads.
The context is built inside a jitted step (its fields are static there), never passed through
a jit boundary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from frontier_jax.model.latent_cache import Pages


@dataclasses.dataclass(frozen=True)
class ExtendContext:
    pages: Pages
    absorbed: bool = False
    attention: str = "xla"

    @property
    def token_mask(self) -> jax.Array:
        """[B, T] int32, 1 for the real tokens (those the step writes)."""
        return self.pages.write.astype(jnp.int32)
