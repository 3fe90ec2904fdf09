"""config.json <-> ModelConfig mapping."""

import dataclasses
import math
import re

import pytest
from transformers import DeepseekV3Config

from frontier_jax.config import load_config
from frontier_jax.convert import hf_config_to_model_config, model_config_to_hf_config
from frontier_jax.model import ModelConfig, RopeScalingConfig
from frontier_jax.model.rope import rope_amplitude, softmax_scale

from .helpers import TINY

V3_FILE = {
    **TINY,
    "model_type": "deepseek_v3",
    "rope_theta": 50000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}

# The published config.json files (auto_map and the like trimmed).
DEEPSEEK_V3_JSON = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
DEEPSEEK_V2_LITE_JSON = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 10944,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 16,
    "num_experts_per_tok": 6,
    "num_hidden_layers": 27,
    "num_key_value_heads": 16,
    "pretraining_tp": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 1.0,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "greedy",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 102400,
}


@pytest.mark.parametrize(
    "hf, preset",
    [(DEEPSEEK_V3_JSON, "model/deepseek-v3-671b"), (DEEPSEEK_V2_LITE_JSON, "model/deepseek-v2-lite")],
)
def test_released_config_json_maps_to_the_model_preset(hf, preset):
    expected = load_config(preset).model
    mapped = hf_config_to_model_config(hf)
    assert dataclasses.replace(mapped, name=expected.name, init_std=expected.init_std) == expected


def test_legacy_rope_scaling_and_transformers5_rope_parameters_map_alike():
    legacy = hf_config_to_model_config(V3_FILE)
    params = {**V3_FILE, "rope_scaling": None}
    params.pop("rope_theta")
    params["rope_parameters"] = {**V3_FILE["rope_scaling"], "rope_type": "yarn", "rope_theta": 50000.0}
    params["rope_parameters"].pop("type")
    assert hf_config_to_model_config(params) == legacy
    assert legacy.rope_theta == 50000.0
    assert legacy.rope_scaling == RopeScalingConfig("yarn", 4.0, 64, 32.0, 1.0, 1.0, 1.0)


def test_nulls_map_to_full_rank_query_and_one_group():
    cfg = hf_config_to_model_config({**V3_FILE, "q_lora_rank": None, "n_group": None, "topk_group": None})
    assert (cfg.q_lora_rank, cfg.n_group, cfg.topk_group) == (0, 1, 1)


def test_v2_defaults_to_softmax_greedy_routing_without_groups():
    cfg = hf_config_to_model_config({**TINY, "model_type": "deepseek_v2"})
    assert (cfg.scoring_func, cfg.n_group, cfg.topk_group, cfg.norm_topk_prob) == ("softmax", 1, 1, False)


def test_yarn_without_mscale_keeps_transformers_attention_factor():
    """transformers: attention_factor = m(s, 1) unless both mscale and mscale_all_dim are set."""
    cfg = hf_config_to_model_config(
        {
            **V3_FILE,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale_all_dim": 0.5,
            },
        }
    )
    assert rope_amplitude(cfg) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert softmax_scale(cfg) == pytest.approx(cfg.qk_head_dim**-0.5 * (0.05 * math.log(4.0) + 1) ** 2)


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(),
        ModelConfig(q_lora_rank=0, tie_embeddings=True, mtp_depth=1, first_k_dense=0),
        ModelConfig(
            n_group=4, topk_group=2, rope_scaling=RopeScalingConfig("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 1.0)
        ),
        ModelConfig(scoring_func="softmax", norm_topk_prob=False, n_group=2, topk_group=1),
    ],
    ids=["default", "full_rank_tied_mtp", "grouped_yarn", "softmax_v2"],
)
def test_model_config_survives_a_trip_through_config_json(cfg):
    hf = model_config_to_hf_config(cfg)
    assert dataclasses.replace(hf_config_to_model_config(hf), name=cfg.name) == cfg


def test_exported_config_builds_a_transformers_config_with_the_same_rope():
    cfg = ModelConfig(rope_scaling=RopeScalingConfig("yarn", 40.0, 4096, 32.0, 1.0, 0.707, 1.0))
    hf = DeepseekV3Config(**model_config_to_hf_config(cfg))
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 40.0
    assert hf.rope_parameters["mscale"] == 0.707 and hf.q_lora_rank == cfg.q_lora_rank


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"sliding_window": 4096}, "sliding_window"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
        ({"scoring_func": "sigmoid", "topk_method": "greedy"}, "topk_method='greedy'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
        ({"model_type": "llama"}, "model_type='llama'"),
    ],
)
def test_unsupported_settings_are_errors_naming_the_key(change, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        hf_config_to_model_config({**V3_FILE, **change})
