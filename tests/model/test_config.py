"""Model and impl configs: invalid values raise ValueError naming the offending field (and, for
closed choices, the allowed values)."""

import re

import pytest
from flax import nnx

from frontier_jax.config import load_config
from frontier_jax.model import ModelConfig, RopeScalingConfig, Transformer
from frontier_jax.model.config import ImplConfig

from . import common


def test_default_and_tiny_configs_are_valid():
    assert ModelConfig().validate().qk_head_dim == 16 + 8
    cfg = common.tiny_config()
    assert cfg.num_moe_layers == 2


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_experts_per_tok=9, n_routed_experts=8, n_group=1, topk_group=1), "num_experts_per_tok"),
        (dict(n_group=2, topk_group=3), "topk_group"),
        (dict(n_routed_experts=8, n_group=3, topk_group=1), "n_group"),
        (dict(n_routed_experts=8, n_group=8, topk_group=2), "n_group"),  # groups of 1 expert: no top-2
        (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
        (dict(hidden_size=-8), "hidden_size"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(num_heads=-1), "num_heads"),
        (dict(kv_lora_rank=0), "kv_lora_rank"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(v_head_dim=-2), "v_head_dim"),
        (dict(moe_ffn_dim=-4), "moe_ffn_dim"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(mtp_depth=-1), "mtp_depth"),
        (dict(first_k_dense=-1), "first_k_dense"),
        (dict(first_k_dense=3, num_layers=2), "first_k_dense"),
        (dict(dense_ffn_dim=0), "dense_ffn_dim"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(rope_scaling=RopeScalingConfig(type="yarn", factor=0.5)), "rope_scaling.factor"),
        (
            dict(rope_scaling=RopeScalingConfig(type="yarn", factor=4, beta_fast=1, beta_slow=2)),
            "rope_scaling.beta_fast",
        ),
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"model\.{field}="):
        common.tiny_config(**changes)


@pytest.mark.parametrize(
    "override,field,allowed",
    [
        ("impl.attention=flash", "impl.attention", "xla, cudnn, tokamax"),
        ("impl.moe_dispatch=token_choice", "impl.moe_dispatch", "dropless, capacity"),
        ("model.scoring_func=relu", "model.scoring_func", "sigmoid, softmax"),
        ("impl.remat=some", "impl.remat", "none, full, save_dots, save_attention_out, experts"),
        ("impl.gmm=megablox", "impl.gmm", "auto, pallas, ragged_dot, tokamax"),
        ("model.rope_scaling.type=ntk", "model.rope_scaling.type", "none, yarn"),
    ],
)
def test_closed_choice_outside_its_enum_names_the_field_and_the_allowed_values(override, field, allowed):
    with pytest.raises(
        ValueError,
        match=rf"^{re.escape(field)}='\w+' is invalid: allowed values are "
        rf"{re.escape(allowed)}$",
    ):
        load_config(None, [override])


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(moe_capacity_factor=-1.0), "moe_capacity_factor"),
        (dict(ep_overlap_chunks=0), "ep_overlap_chunks"),
        (dict(gmm="ragged_dot", gmm_gather="fused"), "gmm_gather"),
        (dict(gmm="tokamax", gmm_gather="dispatch"), "gmm_gather"),
        (dict(scan_layers="no"), "scan_layers"),
    ],
)
def test_invalid_impl_config_raises_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"impl\.{field}="):
        ImplConfig(**changes).validate()


def test_moe_fields_are_not_checked_for_a_dense_only_model():
    cfg = common.tiny_config(num_layers=2, first_k_dense=2, mtp_depth=0, n_routed_experts=0)
    assert cfg.num_moe_layers == 0


def test_mtp_needs_valid_moe_fields_even_without_moe_layers():
    with pytest.raises(ValueError, match=r"model\.n_routed_experts="):
        common.tiny_config(num_layers=2, first_k_dense=2, mtp_depth=1, n_routed_experts=0)


def test_replace_validates_and_transformer_validates():
    cfg = common.tiny_config()
    with pytest.raises(ValueError, match=r"model\.num_heads="):
        cfg.replace(num_heads=0)
    with pytest.raises(ValueError, match=r"impl\.moe_capacity_factor="):
        nnx.eval_shape(
            lambda: Transformer(ModelConfig(), impl=ImplConfig(moe_capacity_factor=0.0), rngs=nnx.Rngs(0))
        )


def test_scan_layers_loads_from_an_override_and_rejects_a_non_bool():
    assert load_config(None, ["impl.scan_layers=false"]).impl.scan_layers is False
    with pytest.raises(ValueError, match=r"impl\.scan_layers.*not a valid bool"):
        load_config(None, ["impl.scan_layers=maybe"])
