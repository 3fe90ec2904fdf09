"""What the router hands to the expert computation (the `Router` module is `model.routing`)."""

from __future__ import annotations

from typing import NamedTuple

import jax


class Routing(NamedTuple):
    weights: jax.Array  # [N, K] gate values g (fp32)
    experts: jax.Array  # [N, K] int32 expert indices
    scores: jax.Array  # [N, N_r] unbiased affinities s (fp32)
