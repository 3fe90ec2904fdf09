"""Hugging Face `config.json` (DeepseekV3 / DeepseekV2) <-> `ModelConfig`.

Names map as follows (HF -> ours):
  num_hidden_layers -> num_layers, first_k_dense_replace -> first_k_dense,
  intermediate_size -> dense_ffn_dim, moe_intermediate_size -> moe_ffn_dim,
  num_attention_heads -> num_heads, q_lora_rank (null = full-rank query) -> q_lora_rank (0),
  n_group / topk_group (null -> 1), num_nextn_predict_layers (alias num_mtp_layers) -> mtp_depth,
  tie_word_embeddings -> tie_embeddings, initializer_range -> init_std; the other sizes keep
  their names.
RoPE: `rope_scaling` (V2/V3 files, key `type` or `rope_type`) or transformers-5
`rope_parameters` (which may hold `rope_theta`); types "default" (none) and "yarn".  A missing
`mscale` / `mscale_all_dim` becomes 0 ("unset"), which our YaRN treats as HF does.
Routing: (scoring_func, topk_method) must be (sigmoid, noaux_tc) -- V3, with the selection bias
`e_score_correction_bias` -- or (softmax, greedy | group_limited_greedy) -- V2, no bias; greedy
means no group limit (n_group = topk_group = 1).  Defaults follow the model_type (V3: sigmoid,
noaux_tc, norm_topk_prob true; V2: softmax, greedy, norm_topk_prob false).
Keys that change the weights' layout rather than the model (`rope_interleave`,
`quantization_config`) are read by the importer; keys without effect on the forward pass are
ignored; any other key, or a setting the model cannot express, is an error naming the key.
"""

from __future__ import annotations

from frontier_jax.model.config import ModelConfig, RopeScalingConfig

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")

_DEFAULTS = {
    "deepseek_v3": dict(
        n_shared_experts=1,
        first_k_dense_replace=3,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        topk_method="noaux_tc",
    ),
    "deepseek_v2": dict(
        n_shared_experts=2,
        first_k_dense_replace=0,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
        scoring_func="softmax",
        topk_method="greedy",
    ),
}
_ROUTING = {("sigmoid", "noaux_tc"), ("softmax", "greedy"), ("softmax", "group_limited_greedy")}

_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts_per_tok",
)
_MAPPED = (
    set(_REQUIRED)
    | set(_DEFAULTS["deepseek_v3"])
    | {
        "model_type",
        "q_lora_rank",
        "n_group",
        "topk_group",
        "rms_norm_eps",
        "max_position_embeddings",
        "initializer_range",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "num_nextn_predict_layers",
        "num_mtp_layers",
        "qk_head_dim",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
        "moe_layer_freq",
        "rope_interleave",
        "quantization_config",
    }
)
# No effect on the forward pass: metadata, generation/serving settings, the auxiliary-loss
# weights of training, expert-parallel degree, and MHA bookkeeping (head_dim,
# num_key_value_heads) that MLA does not use.
_IGNORED = {
    "architectures",
    "auto_map",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "pretraining_tp",
    "output_router_logits",
    "aux_loss_alpha",
    "seq_aux",
    "ep_size",
    "num_key_value_heads",
    "head_dim",
    "attention_dropout",
    "tokenizer_class",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "id2label",
    "label2id",
    "router_aux_loss_coef",
}
# Settings that must hold because the model has no switch for them: key -> required value.
_FIXED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "moe_layer_freq": 1}


def _unsupported(key: str, value, why: str) -> ValueError:
    return ValueError(f"HF config {key}={value!r} is not supported: {why}")


def _rope_scaling(hf: dict) -> tuple[float, RopeScalingConfig]:
    """-> (rope_theta, RopeScalingConfig) from rope_scaling / rope_parameters."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(key) or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind == "default":
        return theta, RopeScalingConfig()
    if kind != "yarn":
        raise _unsupported(f"{key}.rope_type", kind, "only 'default' and 'yarn' RoPE are implemented")
    if not params.pop("truncate", True):
        raise _unsupported(f"{key}.truncate", False, "YaRN correction bounds are always rounded")
    attention_factor = params.pop("attention_factor", None)
    if attention_factor is not None:
        raise _unsupported(
            f"{key}.attention_factor",
            attention_factor,
            "the attention factor is derived from mscale / mscale_all_dim",
        )
    max_positions = hf.get("max_position_embeddings", 4096)
    original = int(params.pop("original_max_position_embeddings", None) or max_positions)
    factor = params.pop("factor", None) or max_positions / original
    scaling = RopeScalingConfig(
        type="yarn",
        factor=float(factor),
        original_max_position_embeddings=original,
        beta_fast=float(params.pop("beta_fast", None) or 32.0),
        beta_slow=float(params.pop("beta_slow", None) or 1.0),
        mscale=float(params.pop("mscale", None) or 0.0),
        mscale_all_dim=float(params.pop("mscale_all_dim", None) or 0.0),
    )
    if params:
        raise _unsupported(f"{key}.{sorted(params)[0]}", params[sorted(params)[0]], "unknown YaRN setting")
    return theta, scaling


def hf_config_to_model_config(hf: dict) -> ModelConfig:
    """A validated ModelConfig from a DeepseekV3/V2 config.json dict.  mtp_depth is the
    configured num_nextn_predict_layers; `from_hf` lowers it to the MTP layers present."""
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in MODEL_TYPES:
        raise _unsupported("model_type", model_type, f"expected one of {', '.join(MODEL_TYPES)}")
    unknown = sorted(set(hf) - _MAPPED - _IGNORED)
    if unknown:
        raise ValueError(f"HF config key(s) {', '.join(unknown)} are not supported by the converter")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"HF config lacks required key(s) {', '.join(missing)}")
    for key, value in _FIXED.items():
        if key in hf and hf[key] != value:
            raise _unsupported(key, hf[key], f"the model implements only {key}={value!r}")
    get = lambda key: hf[key] if key in hf else _DEFAULTS[model_type][key]
    scoring = hf.get("scoring_func") or _DEFAULTS[model_type]["scoring_func"]
    method = hf.get("topk_method") or _DEFAULTS[model_type]["topk_method"]
    if (scoring, method) not in _ROUTING:
        raise _unsupported(
            "topk_method",
            method,
            f"with scoring_func={scoring!r}; supported pairs are "
            + ", ".join(f"({s}, {m})" for s, m in sorted(_ROUTING)),
        )
    grouped = method != "greedy"
    qk_head_dim = hf["qk_nope_head_dim"] + hf["qk_rope_head_dim"]
    if hf.get("qk_head_dim") not in (None, qk_head_dim):
        raise _unsupported(
            "qk_head_dim",
            hf["qk_head_dim"],
            f"must equal qk_nope_head_dim + qk_rope_head_dim = {qk_head_dim}",
        )
    theta, scaling = _rope_scaling(hf)
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers"))
    return ModelConfig(
        name=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        first_k_dense=min(get("first_k_dense_replace") or 0, hf["num_hidden_layers"]),
        dense_ffn_dim=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_heads=hf["num_attention_heads"],
        q_lora_rank=hf.get("q_lora_rank") or 0,
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        n_routed_experts=hf["n_routed_experts"],
        n_shared_experts=get("n_shared_experts") or 0,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_ffn_dim=hf["moe_intermediate_size"],
        n_group=(hf.get("n_group") or 1) if grouped else 1,
        topk_group=(hf.get("topk_group") or 1) if grouped else 1,
        routed_scaling_factor=float(get("routed_scaling_factor")),
        norm_topk_prob=bool(get("norm_topk_prob")),
        scoring_func=scoring,
        mtp_depth=mtp or 0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    ).validate()


def rope_interleaved(hf: dict) -> bool:
    """Whether the checkpoint stores rotary rows as interleaved pairs: always for V2, per
    `rope_interleave` (default true) for V3."""
    return hf.get("model_type", "deepseek_v3") == "deepseek_v2" or hf.get("rope_interleave") is not False


def model_config_to_hf_config(cfg: ModelConfig) -> dict:
    """The config.json of `cfg` in the released layout: DeepseekV3 for sigmoid routing (rotary
    rows interleaved), DeepseekV2 for softmax routing; legacy `rope_theta` / `rope_scaling`
    names, which every transformers version and DeepSeek's own code read."""
    v3 = cfg.scoring_func == "sigmoid"
    rs = cfg.rope_scaling
    rope_scaling = None
    if rs.type == "yarn":
        rope_scaling = {
            "type": "yarn",
            "factor": rs.factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
            "beta_fast": rs.beta_fast,
            "beta_slow": rs.beta_slow,
        }
        rope_scaling.update({k: getattr(rs, k) for k in ("mscale", "mscale_all_dim") if getattr(rs, k)})
    hf = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "first_k_dense_replace": cfg.first_k_dense,
        "intermediate_size": cfg.dense_ffn_dim,
        "moe_intermediate_size": cfg.moe_ffn_dim,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "scoring_func": cfg.scoring_func,
        "topk_method": "noaux_tc" if v3 else ("group_limited_greedy" if cfg.n_group > 1 else "greedy"),
        "moe_layer_freq": 1,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "num_nextn_predict_layers": cfg.mtp_depth,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }
    if v3:
        hf["rope_interleave"] = True
    return hf
