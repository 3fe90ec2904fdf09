"""The real initialisers (the other tests overwrite parameters with their own random values):
N(0, init_std^2) weights, unit norm scales, zero routing bias, independent layers; logical axis
metadata consistent with every variable's rank."""

import jax
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model import Transformer
from frontier_jax.parallel.rules import DEFAULT_RULES

from . import common

CFG = dict(init_std=0.02, num_layers=2, first_k_dense=0, mtp_depth=2)


@pytest.fixture(scope="module")
def initial_values():
    cfg = common.tiny_config(**CFG)
    pure = common.fast_jit(lambda: nnx.state(Transformer(cfg, rngs=nnx.Rngs(0))).to_pure_dict())()
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]
    }


def test_weights_are_normal_with_init_std_and_norms_one_bias_zero(initial_values):
    # std within 20% of 0.02 and |mean| < 0.25 std for every weight with >= 256 entries
    for name, value in initial_values.items():
        if name.endswith("['scale']"):
            np.testing.assert_array_equal(value, 1.0, err_msg=name)
        elif name.endswith("['bias']"):
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
        elif value.size >= 256:
            assert abs(value.std() - 0.02) < 0.2 * 0.02, name
            assert abs(value.mean()) < 0.25 * 0.02, name


def test_stacked_layers_and_mtp_depths_are_initialised_independently(initial_values):
    stacked = {
        k: v
        for k, v in initial_values.items()
        if k.startswith(("['moe_layers']", "['mtp']")) and "scale" not in k and "bias" not in k
    }
    assert stacked
    for name, value in stacked.items():
        assert value.shape[0] == 2, name
        assert not np.allclose(value[0], value[1]), name
    # and different module kinds do not share draws
    assert not np.allclose(
        initial_values["['moe_layers']['blocks']['attn']['wq_a']['kernel']"][0],
        initial_values["['mtp']['modules']['block']['attn']['wq_a']['kernel']"][0],
    )


def test_every_variable_has_logical_axes_of_its_rank_with_a_sharding_rule():
    cfg = common.tiny_config(**CFG)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    count = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            assert axes is not None, path
            assert len(axes) == len(var.get_value().shape), (path, axes)
            assert all(a in DEFAULT_RULES for a in axes), (path, axes)
            stacked = {"dense_layers": "dense_layers", "moe_layers": "layers", "mtp": "mtp_layers"}
            if path[0] in stacked:  # `layers` alone is split over pipeline stages
                assert axes[0] == stacked[path[0]], (path, axes)
            count += 1
    assert count > 40
