"""Session-wide tiny models shared by the transformer and MTP tests (built once per worker)."""

import pytest
from flax import nnx

from frontier_jax.model import Transformer

from . import common


@pytest.fixture(scope="session")
def dense_moe_model():
    """1 dense + 2 MoE layers, MTP depth 1, untied head, YaRN, group-limited sigmoid routing."""
    cfg = common.tiny_config()
    return cfg, common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=0)


@pytest.fixture(scope="session")
def moe_only_tied_model():
    """2 MoE layers (no dense prefix), MTP depth 2, tied embeddings."""
    cfg = common.tiny_config(num_layers=2, first_k_dense=0, mtp_depth=2, tie_embeddings=True)
    return cfg, common.build(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(params=["dense_moe_model", "moe_only_tied_model"])
def any_model(request):
    return request.getfixturevalue(request.param)
