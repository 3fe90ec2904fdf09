"""One factory and two heads (frontier_jax/model/factory.py, head.py, reward.py): every model of the
package comes from `build_model`; a scalar head reads one value per packed segment at its last
token, against the float64 reference; describe counts it; an MTP model run without MTP gives
zero MTP loads instead of an error."""

from __future__ import annotations

import ast
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model import build_model
from frontier_jax.model.describe import describe
from frontier_jax.model.reward import segment_ends

from . import common
from . import reference as ref

PACKAGE = Path(__file__).resolve().parents[2] / "frontier_jax"


def test_build_model_is_the_only_place_a_transformer_is_constructed():
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            func = getattr(node, "func", None) if isinstance(node, ast.Call) else None
            name = getattr(func, "id", None) or getattr(func, "attr", None)
            if name == "Transformer":
                calls.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert [c.split(":")[0] for c in calls] == ["frontier_jax/model/factory.py"], calls


def test_segment_ends_are_the_last_position_of_each_segment():
    seg = common.PACKED_SEGMENTS  # [[1 1 1 2 2 2 2 0], [1 1 1 1 1 1 2 2]]
    ends, present = segment_ends(jnp.asarray(seg), 3)
    np.testing.assert_array_equal(np.asarray(ends), [[2, 6, 0], [5, 7, 0]])
    np.testing.assert_array_equal(np.asarray(present), [[True, True, False], [True, True, False]])


@pytest.fixture(scope="module")
def scalar_model():
    cfg = common.tiny_config(head="scalar", mtp_depth=0)
    return cfg, common.build(lambda: build_model(cfg, rngs=nnx.Rngs(0)), seed=4)


def test_scalar_head_reads_each_segment_at_its_last_token(scalar_model):
    # fp32 vs float64 through 3 blocks, final norm and w: rtol 1e-4, atol 5e-5 (as the logits)
    cfg, model = scalar_model
    ids, seg, pos = common.token_ids(cfg, 2), common.PACKED_SEGMENTS, common.PACKED_POSITIONS
    values, present = common.jit(lambda m, i, p, s: m.values(i, p, s, segments=3))(
        model, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)
    )
    want, want_present = ref.segment_values(common.params_f64(model), ids, cfg, pos, seg, 3)
    np.testing.assert_array_equal(np.asarray(present), want_present)
    assert values.shape == (common.B, 3) and values.dtype == jnp.float32
    common.assert_close(values, want, rtol=1e-4, atol=5e-5)
    assert np.all(np.asarray(values)[~want_present] == 0)


def test_a_scalar_model_has_no_lm_head_or_mtp(scalar_model):
    cfg, model = scalar_model
    params = nnx.state(model, nnx.Param)
    assert "score" in params and "head" not in params and "mtp" not in params
    assert params["score"]["kernel"].shape == (cfg.hidden_size, 1)
    with pytest.raises(
        ValueError, match=r"logits needs a language model \(model.head=lm\).*model.head=scalar"
    ):
        model.output_head().logits(jnp.zeros((1, cfg.hidden_size)))
    with pytest.raises(ValueError, match=r"model.mtp_depth=1 is invalid: must be 0 with model.head=scalar"):
        common.tiny_config(head="scalar", mtp_depth=1)


def test_describe_counts_the_scalar_head():
    lm, scalar = common.tiny_config(mtp_depth=0), common.tiny_config(head="scalar", mtp_depth=0)
    d = lm.hidden_size
    assert describe(scalar)["total_params"] == describe(lm)["total_params"] - d * lm.vocab_size + d
    assert describe(scalar)["active_params"] == describe(lm)["active_params"] - d * lm.vocab_size + d


def test_expert_loads_of_a_forward_without_mtp_are_zero_for_the_mtp_stack(dense_moe_model):
    """An objective that runs an MTP model without its MTP modules (before: ValueError)."""
    cfg, model = dense_moe_model
    out = common.jit(lambda m, i: m.hidden(i, with_mtp=False))(model, jnp.asarray(common.token_ids(cfg)))
    loads = model.expert_loads(out)
    assert set(loads) == {"moe_layers", "mtp"}
    np.testing.assert_array_equal(
        np.asarray(loads["moe_layers"]["blocks"]["ffn"]["router"]["bias"]), out.moe_stats.load
    )
    mtp = np.asarray(loads["mtp"]["modules"]["block"]["ffn"]["router"]["bias"])
    assert mtp.shape == (cfg.mtp_depth, cfg.n_routed_experts) and not mtp.any()
