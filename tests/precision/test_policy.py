"""The policy registry and config key, which layers run in fp8, bad input, and fp8 projections
inside `Linear` and a whole model (close to fp32, loosely)."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.model import Transformer
from frontier_jax.model.layers import Linear
from frontier_jax.precision import POLICIES, PrecisionPolicy, get_policy
from frontier_jax.precision import policy as policy_module
from tests.model import common

# every projection of a model with q-LoRA, a dense prefix, shared experts and MTP (policy.py)
LINEAR_LAYERS = {
    "mla.wq_a",
    "mla.wq_b",
    "mla.wkv_a",
    "mla.wk_rope",
    "mla.wk_b",
    "mla.wv_b",
    "mla.wo",
    *(f"{ffn}.{w}" for ffn in ("dense_ffn", "moe.shared") for w in ("w_gate", "w_up", "w_down")),
    "mtp.proj",
}
JOINT_LAYERS = {
    "mla.wq_a+mla.wkv_a+mla.wk_rope",
    "mla.wk_b+mla.wv_b",
    *(f"{ffn}.w_gate+{ffn}.w_up" for ffn in ("dense_ffn", "moe.shared")),
}


def test_registry_and_unknown_name():
    assert set(POLICIES) == {"fp32", "bf16", "fp8_tensor", "fp8_deepseek"}
    assert get_policy("fp8_deepseek").fp8.block == 128 and get_policy("fp8_tensor").fp8.block is None
    with pytest.raises(ValueError, match=r"precision.policy='fp9'.*fp32, bf16, fp8_tensor, fp8_deepseek"):
        get_policy("fp9")
    assert load_config("train/toy", ["precision.policy=fp8_deepseek"]).precision.policy == "fp8_deepseek"
    with pytest.raises(ValueError, match=r"precision.policy='fp9'.*fp8_tensor, fp8_deepseek"):
        load_config("train/toy", ["precision.policy=fp9"])


def test_fp8_layers_selects_projections_by_name():
    fp8 = get_policy("fp8_deepseek")
    assert all(fp8.uses_fp8(name) for name in LINEAR_LAYERS | {"moe.experts.w_up"})
    assert not any(get_policy(p).uses_fp8("mla.wq_a") for p in ("bf16", "fp32"))
    attention_only = PrecisionPolicy("attention_only", jnp.bfloat16, fp8=fp8.fp8, fp8_layers=("mla.*",))
    assert attention_only.uses_fp8("mla.wo") and not attention_only.uses_fp8("dense_ffn.w_up")
    assert attention_only.grouped_matmul("moe.experts.w_up") is None
    assert attention_only.dot_general("dense_ffn.w_up") is get_policy("bf16").dot_general("dense_ffn.w_up")


@pytest.mark.parametrize("tokens", [(16, 64), (1, 1)])
def test_the_documented_projections_are_the_ones_that_reach_the_policy(tokens):
    asked = set()

    class Recording(PrecisionPolicy):
        def dot_general(self, layer):
            asked.add(layer)
            return super().dot_general(layer)

    cfg = common.tiny_config()
    model = nnx.eval_shape(lambda: Transformer(cfg, policy=Recording("rec", jnp.float32), rngs=nnx.Rngs(0)))
    jax.eval_shape(lambda m: m.forward(jnp.zeros(tokens, jnp.int32)), model)
    if tokens == (1, 1):  # one row: joining would copy the kernels for nothing (`joining_pays`)
        assert asked == LINEAR_LAYERS
        return
    # projections that read the same input ask once, as a joint layer (`project_jointly`)
    assert asked == JOINT_LAYERS | (LINEAR_LAYERS - {p for j in JOINT_LAYERS for p in j.split("+")})
    assert {p for layer in asked for p in layer.split("+")} == LINEAR_LAYERS  # embedding, head,
    # router, norms, attention core: never


def test_a_joint_layer_is_fp8_when_all_its_parts_are():
    fp8 = get_policy("fp8_deepseek")
    assert all(fp8.uses_fp8(layer) for layer in JOINT_LAYERS)
    only_q = PrecisionPolicy("only_q", jnp.bfloat16, fp8=fp8.fp8, fp8_layers=("mla.wq_a", "mla.wkv_a"))
    assert only_q.uses_fp8("mla.wq_a+mla.wkv_a") and not only_q.uses_fp8("mla.wq_a+mla.wkv_a+mla.wk_rope")


def test_unsupported_contraction_is_refused_naming_layer_shape_and_policy():
    dot = get_policy("fp8_deepseek").dot_general("mla.wo")
    x, w = jnp.ones((4, 8, 16)), jnp.ones((8, 32))
    with pytest.raises(ValueError, match=r"mla.wo.*fp8_deepseek.*\(4, 8, 16\)"):
        dot(x, w, (((1,), (0,)), ((), ())))  # contracts a middle axis of x
    with pytest.raises(ValueError, match=r"mla.wo.*fp8_deepseek.*int32"):
        dot(jnp.ones((4, 8), jnp.int32), w, (((1,), (0,)), ((), ())))


def test_emulation_on_a_backend_without_fp8_units_is_logged_once(caplog):
    policy_module._note_fp8_backend.cache_clear()
    with caplog.at_level(logging.WARNING, logger=policy_module.__name__):
        for layer in ("mla.wq_a", "mla.wo"):
            get_policy("fp8_deepseek").dot_general(layer)
    assert len(caplog.records) == 1 and "emulated" in caplog.records[0].getMessage()


def test_linear_with_multi_dim_shapes_is_close_to_fp32():
    """wo-like: x [B, T, H, Dv] contracted over (H, Dv) = 96 (padded to 128) into [B, T, 96]."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 4, 24))

    def make(policy):
        return Linear(
            (4, 24),
            (96,),
            ("heads", "v_head", "embed"),
            name="mla.wo",
            std=0.1,
            policy=get_policy(policy),
            rngs=nnx.Rngs(0),
        )

    want = np.asarray(make("fp32")(x))
    got = make("fp8_deepseek")(x)
    assert got.shape == (2, 8, 96) and got.dtype == jnp.bfloat16
    assert np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want) < 0.05


def test_model_forward_with_fp8_is_close_to_fp32():
    """The model as initialised (std 0.02).  With O(1) random weights instead the model is
    chaotic: bf16 rounding alone moves the logits by 2% and fp8 by 40% (fp8 rounds 32x coarser)."""
    cfg = common.tiny_config()
    ids = common.token_ids(cfg)
    reference = Transformer(cfg, policy=get_policy("fp32"), rngs=nnx.Rngs(0))
    fp8 = common.copy_state(
        reference,
        nnx.eval_shape(lambda: Transformer(cfg, policy=get_policy("fp8_deepseek"), rngs=nnx.Rngs(0))),
    )
    forward = common.jit(lambda m, i: m.forward(i).logits)
    want, got = (np.asarray(forward(m, ids), np.float64) for m in (reference, fp8))
    assert np.all(np.isfinite(got))
    # observed 0.0072 (bf16 alone: 0.0043)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03
