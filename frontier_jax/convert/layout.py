"""Tensor layouts: Hugging Face DeepseekV3/V2 weights <-> our parameters, one layer at a time.

HF linear weights are W [out, in] (y = x W^T); our kernels are [in, out] with the head axis
split out.  With d = hidden, H = heads, dn/dr/dv = qk_nope/qk_rope/v head dims, E experts,
f = moe_ffn_dim (HF prefix `model.layers.{i}.`, our paths relative to a block):

  self_attn.q_a_proj [q_lora, d]              attn.wq_a.kernel [d, q_lora]
  self_attn.q_a_layernorm [q_lora]            attn.q_norm.scale
  self_attn.q_b_proj [H (dn+dr), q_lora]      attn.wq_b.kernel [q_lora, H, dn+dr]
  self_attn.q_proj [H (dn+dr), d]             attn.wq.kernel [d, H, dn+dr]     (q_lora_rank 0)
  self_attn.kv_a_proj_with_mqa [kv+dr, d]     rows :kv -> attn.wkv_a.kernel [d, kv],
                                              rows kv: -> attn.wk_rope.kernel [d, dr]
  self_attn.kv_a_layernorm [kv]               attn.kv_norm.scale
  self_attn.kv_b_proj [H (dn+dv), kv]         per head rows :dn -> attn.wk_b.kernel [kv, H, dn],
                                              rows dn: -> attn.wv_b.kernel [kv, H, dv]
  self_attn.o_proj [d, H dv]                  attn.wo.kernel [H, dv, d]
  input_layernorm / post_attention_layernorm  attn_norm.scale / ffn_norm.scale
  mlp.{gate,up,down}_proj (dense layers)      ffn.w_{gate,up,down}.kernel (transposed)
  mlp.gate.weight [E, d]                      ffn.router.kernel [d, E]
  mlp.gate.e_score_correction_bias [E]        ffn.router.bias (sigmoid routing; V2's softmax
                                              routing has no bias and gets zeros)
  mlp.experts.{e}.{gate,up}_proj [f, d]       ffn.experts.w_{gate,up} [E, d, f]
  mlp.experts.{e}.down_proj [d, f]            ffn.experts.w_down [E, f, d]
    or fused: mlp.experts.gate_up_proj [E, 2f, d] (gate rows first), mlp.experts.down_proj [E, d, f]
  mlp.shared_experts.{gate,up,down}_proj      ffn.shared.w_{gate,up,down}.kernel (transposed)
MTP module k is HF layer num_hidden_layers + k - 1 (ours relative to `mtp.modules`):
  enorm, hnorm -> emb_norm, hidden_norm;  eh_proj [d, 2d] -> proj.kernel [2d, d] (inputs
  [norm(embedding); norm(hidden)] in both);  the decoder layer -> block.*;
  shared_head.norm -> out_norm;  embed_tokens and shared_head.head are copies of the main
  embedding and output head.
RoPE: interleaved checkpoints store the dr rotary rows of each query head and of the shared
rotary key as pairs (x0, x1), (x2, x3), ...; our RoPE rotates halves [x0, x2, ...; x1, x3, ...],
so those rows are reordered by P = [0, 2, 4, ..., 1, 3, 5, ...] on import and by P^-1 on
export.  q and k get the same P, so every q . k -- hence the model -- is unchanged.

`*_from_hf(src, ...)` return {our path: `Lazy`}: nothing is read until a value is asked for,
then the HF tensors it needs are read through `src.get(name, hf_shape)` (float32 arrays), so an
importer can convert and place one parameter at a time.  `*_to_hf(params, ...)` are their exact
inverses, on arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, TypeVar

import numpy as np

from frontier_jax.model.config import ModelConfig

Path = tuple[str, ...]
Params = dict[Path, np.ndarray]
HFTensors = dict[str, np.ndarray]
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Lazy:
    """One converted parameter, computed on demand.

    whole(): the array.  rows(s): whole()[s] for a slice s of axis 0, reading only the checkpoint
    tensors those rows need (the routed experts of an [E, ...] stack), or None when only the whole
    can be computed."""

    whole: Callable[[], np.ndarray]
    rows: Callable[[slice], np.ndarray] | None = None


LazyParams = dict[Path, Lazy]


def _stack(part: Callable[[int], np.ndarray], n: int) -> Lazy:
    """The [n, ...] stack of part(0), ..., part(n - 1), row slices reading only their parts."""

    def rows(s: slice) -> np.ndarray:
        return np.stack([part(i) for i in range(n)[s]])

    return Lazy(lambda: rows(slice(None)), rows)


class Source(Protocol):
    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray: ...

    def __contains__(self, name: str) -> bool: ...


def rope_order(dim: int, interleaved: bool) -> np.ndarray:
    """Row order taking checkpoint rotary rows to our half layout: P, or identity."""
    if not interleaved:
        return np.arange(dim)
    return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def _reorder_rows(w: np.ndarray, start: int, order: np.ndarray) -> np.ndarray:
    """w [..., rows, cols] with rows start: permuted by `order`."""
    return np.concatenate([w[..., :start, :], w[..., start:, :][..., order, :]], axis=-2)


def _prefixed(prefix: Path, params: Params) -> Params:
    return {prefix + path: value for path, value in params.items()}


def _sub(params: Params, prefix: Path) -> Params:
    n = len(prefix)
    return {path[n:]: value for path, value in params.items() if path[:n] == prefix}


# ------------------------------------------------------------------------------------ MLA
def attention_from_hf(src: Source, p: str, cfg: ModelConfig, interleaved: bool) -> LazyParams:
    d, h, kv, qk = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_head_dim
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    order = rope_order(dr, interleaved)
    out: LazyParams = {}
    if cfg.q_lora_rank:
        ql = cfg.q_lora_rank
        out[("wq_a", "kernel")] = Lazy(lambda: src.get(f"{p}self_attn.q_a_proj.weight", (ql, d)).T)
        out[("q_norm", "scale")] = Lazy(lambda: src.get(f"{p}self_attn.q_a_layernorm.weight", (ql,)))
        q_name, q_in, key = f"{p}self_attn.q_b_proj.weight", ql, ("wq_b", "kernel")
    else:
        q_name, q_in, key = f"{p}self_attn.q_proj.weight", d, ("wq", "kernel")
    out[key] = Lazy(
        lambda: _reorder_rows(src.get(q_name, (h * qk, q_in)).reshape(h, qk, -1), dn, order).transpose(
            2, 0, 1
        )
    )

    def kv_a() -> np.ndarray:
        return _reorder_rows(src.get(f"{p}self_attn.kv_a_proj_with_mqa.weight", (kv + dr, d)), kv, order)

    def kv_b() -> np.ndarray:
        return src.get(f"{p}self_attn.kv_b_proj.weight", (h * (dn + dv), kv)).reshape(h, dn + dv, kv)

    out[("wkv_a", "kernel")] = Lazy(lambda: kv_a()[:kv].T)
    out[("wk_rope", "kernel")] = Lazy(lambda: kv_a()[kv:].T)
    out[("kv_norm", "scale")] = Lazy(lambda: src.get(f"{p}self_attn.kv_a_layernorm.weight", (kv,)))
    out[("wk_b", "kernel")] = Lazy(lambda: kv_b()[:, :dn].transpose(2, 0, 1))
    out[("wv_b", "kernel")] = Lazy(lambda: kv_b()[:, dn:].transpose(2, 0, 1))
    out[("wo", "kernel")] = Lazy(
        lambda: src.get(f"{p}self_attn.o_proj.weight", (d, h * dv)).T.reshape(h, dv, d)
    )
    return _prefixed(("attn",), out)


def attention_to_hf(params: Params, p: str, cfg: ModelConfig, interleaved: bool) -> HFTensors:
    w = _sub(params, ("attn",))
    h, dn, dr, kv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    inverse = np.argsort(rope_order(dr, interleaved))
    out: HFTensors = {}
    if cfg.q_lora_rank:
        out[f"{p}self_attn.q_a_proj.weight"] = w[("wq_a", "kernel")].T
        out[f"{p}self_attn.q_a_layernorm.weight"] = w[("q_norm", "scale")]
        q, name = w[("wq_b", "kernel")], f"{p}self_attn.q_b_proj.weight"
    else:
        q, name = w[("wq", "kernel")], f"{p}self_attn.q_proj.weight"
    out[name] = _reorder_rows(q.transpose(1, 2, 0), dn, inverse).reshape(h * cfg.qk_head_dim, -1)
    kv_a = np.concatenate([w[("wkv_a", "kernel")].T, w[("wk_rope", "kernel")].T])
    out[f"{p}self_attn.kv_a_proj_with_mqa.weight"] = _reorder_rows(kv_a, kv, inverse)
    out[f"{p}self_attn.kv_a_layernorm.weight"] = w[("kv_norm", "scale")]
    kv_b = np.concatenate([w[("wk_b", "kernel")], w[("wv_b", "kernel")]], axis=-1)  # [kv, H, dn+dv]
    out[f"{p}self_attn.kv_b_proj.weight"] = kv_b.transpose(1, 2, 0).reshape(-1, kv)
    out[f"{p}self_attn.o_proj.weight"] = w[("wo", "kernel")].reshape(h * cfg.v_head_dim, -1).T
    return out


# ------------------------------------------------------------------------------------ FFNs
def _swiglu_from_hf(src: Source, p: str, d: int, f: int) -> LazyParams:
    return {
        ("w_gate", "kernel"): Lazy(lambda: src.get(f"{p}gate_proj.weight", (f, d)).T),
        ("w_up", "kernel"): Lazy(lambda: src.get(f"{p}up_proj.weight", (f, d)).T),
        ("w_down", "kernel"): Lazy(lambda: src.get(f"{p}down_proj.weight", (d, f)).T),
    }


def _swiglu_to_hf(w: Params, p: str) -> HFTensors:
    return {f"{p}{name}_proj.weight": w[(f"w_{name}", "kernel")].T for name in ("gate", "up", "down")}


def moe_from_hf(src: Source, p: str, cfg: ModelConfig) -> LazyParams:
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_ffn_dim
    out: LazyParams = {("router", "kernel"): Lazy(lambda: src.get(f"{p}mlp.gate.weight", (e, d)).T)}
    out[("router", "bias")] = Lazy(
        lambda: (
            src.get(f"{p}mlp.gate.e_score_correction_bias", (e,))
            if cfg.scoring_func == "sigmoid"
            else np.zeros((e,), np.float32)
        )
    )
    if f"{p}mlp.experts.gate_up_proj" in src:
        gate_up = f"{p}mlp.experts.gate_up_proj"
        out[("experts", "w_gate")] = Lazy(lambda: src.get(gate_up, (e, 2 * f, d))[:, :f].transpose(0, 2, 1))
        out[("experts", "w_up")] = Lazy(lambda: src.get(gate_up, (e, 2 * f, d))[:, f:].transpose(0, 2, 1))
        out[("experts", "w_down")] = Lazy(
            lambda: src.get(f"{p}mlp.experts.down_proj", (e, d, f)).transpose(0, 2, 1)
        )
    else:
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):

            def expert(i: int, name: str = name, shape: tuple[int, int] = shape) -> np.ndarray:
                return src.get(f"{p}mlp.experts.{i}.{name}_proj.weight", shape).T

            out[("experts", f"w_{name}")] = _stack(expert, e)
    if cfg.n_shared_experts:
        shared = _swiglu_from_hf(src, f"{p}mlp.shared_experts.", d, cfg.n_shared_experts * f)
        out.update(_prefixed(("shared",), shared))
    return _prefixed(("ffn",), out)


def moe_to_hf(params: Params, p: str, cfg: ModelConfig) -> HFTensors:
    w = _sub(params, ("ffn",))
    out = {f"{p}mlp.gate.weight": w[("router", "kernel")].T}
    bias = w[("router", "bias")]
    if cfg.scoring_func == "sigmoid":
        out[f"{p}mlp.gate.e_score_correction_bias"] = bias
    elif np.any(bias):
        raise ValueError(
            "the router biases are nonzero, but softmax-routed (DeepseekV2) checkpoints "
            "have no e_score_correction_bias to hold them"
        )
    for name in ("gate", "up", "down"):
        stacked = w[("experts", f"w_{name}")]
        out.update({f"{p}mlp.experts.{e}.{name}_proj.weight": stacked[e].T for e in range(len(stacked))})
    if cfg.n_shared_experts:
        out.update(_swiglu_to_hf(_sub(w, ("shared",)), f"{p}mlp.shared_experts."))
    return out


# ----------------------------------------------------------------------------- blocks, MTP
def block_from_hf(src: Source, p: str, cfg: ModelConfig, interleaved: bool, moe: bool) -> LazyParams:
    d = cfg.hidden_size
    out = {
        ("attn_norm", "scale"): Lazy(lambda: src.get(f"{p}input_layernorm.weight", (d,))),
        ("ffn_norm", "scale"): Lazy(lambda: src.get(f"{p}post_attention_layernorm.weight", (d,))),
    }
    out.update(attention_from_hf(src, p, cfg, interleaved))
    if moe:
        out.update(moe_from_hf(src, p, cfg))
    else:
        out.update(_prefixed(("ffn",), _swiglu_from_hf(src, f"{p}mlp.", d, cfg.dense_ffn_dim)))
    return out


def block_to_hf(params: Params, p: str, cfg: ModelConfig, interleaved: bool, moe: bool) -> HFTensors:
    out = {
        f"{p}input_layernorm.weight": params[("attn_norm", "scale")],
        f"{p}post_attention_layernorm.weight": params[("ffn_norm", "scale")],
    }
    out.update(attention_to_hf(params, p, cfg, interleaved))
    out.update(moe_to_hf(params, p, cfg) if moe else _swiglu_to_hf(_sub(params, ("ffn",)), f"{p}mlp."))
    return out


def mtp_from_hf(src: Source, p: str, cfg: ModelConfig, interleaved: bool) -> LazyParams:
    """One MTP module (without the embedding / head copies, see `mtp_copies`)."""
    d = cfg.hidden_size
    out = {
        ("emb_norm", "scale"): Lazy(lambda: src.get(f"{p}enorm.weight", (d,))),
        ("hidden_norm", "scale"): Lazy(lambda: src.get(f"{p}hnorm.weight", (d,))),
        ("proj", "kernel"): Lazy(lambda: src.get(f"{p}eh_proj.weight", (d, 2 * d)).T),
        ("out_norm", "scale"): Lazy(lambda: src.get(f"{p}shared_head.norm.weight", (d,))),
    }
    out.update(_prefixed(("block",), block_from_hf(src, p, cfg, interleaved, moe=True)))
    return out


def mtp_to_hf(params: Params, p: str, cfg: ModelConfig, interleaved: bool) -> HFTensors:
    out = {
        f"{p}enorm.weight": params[("emb_norm", "scale")],
        f"{p}hnorm.weight": params[("hidden_norm", "scale")],
        f"{p}eh_proj.weight": params[("proj", "kernel")].T,
        f"{p}shared_head.norm.weight": params[("out_norm", "scale")],
    }
    out.update(block_to_hf(_sub(params, ("block",)), p, cfg, interleaved, moe=True))
    return out


def mtp_copies(p: str, embedding: T, head: T) -> dict[str, T]:
    """The MTP layer's copies of the shared embedding [V, d] and output head (HF layout [V, d]),
    as arrays or as the names of the tensors they copy."""
    return {f"{p}embed_tokens.weight": embedding, f"{p}shared_head.head.weight": head}


# ------------------------------------------------------------------------------ top level
TOP_LEVEL = ("embed", "final_norm", "head")  # our unstacked modules


def top_from_hf(src: Source, cfg: ModelConfig) -> LazyParams:
    """Embedding, final norm and (untied) output head."""
    v, d = cfg.vocab_size, cfg.hidden_size
    out = {
        ("embed", "embedding"): Lazy(lambda: src.get("model.embed_tokens.weight", (v, d))),
        ("final_norm", "scale"): Lazy(lambda: src.get("model.norm.weight", (d,))),
    }
    if not cfg.tie_embeddings:
        out[("head", "kernel")] = Lazy(lambda: src.get("lm_head.weight", (v, d)).T)
    return out


def top_to_hf(params: Params, cfg: ModelConfig) -> HFTensors:
    out = {
        "model.embed_tokens.weight": params[("embed", "embedding")],
        "model.norm.weight": params[("final_norm", "scale")],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params[("head", "kernel")].T
    return out


def hf_head_name(cfg: ModelConfig) -> str:
    """The HF tensor holding the output head [V, d] (the embedding when tied)."""
    return "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"


def hf_head(hf: HFTensors, cfg: ModelConfig) -> np.ndarray:
    """The output head in HF layout [V, d] (the embedding when tied)."""
    return hf[hf_head_name(cfg)]


def hf_copies(cfg: ModelConfig) -> dict[str, str]:
    """{copy: original} of the tensors a checkpoint may hold twice: lm_head when tied, each MTP
    layer's embed_tokens and shared_head.head."""
    copies = {"lm_head.weight": "model.embed_tokens.weight"} if cfg.tie_embeddings else {}
    for k in range(cfg.mtp_depth):
        copies.update(
            mtp_copies(f"model.layers.{cfg.num_layers + k}.", "model.embed_tokens.weight", hf_head_name(cfg))
        )
    return copies
