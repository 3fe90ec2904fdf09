"""Model arithmetic without allocating a single weight (`nnx.eval_shape`).

total_params   main model (embedding, blocks, final norm, head: the LM head, or the scalar
               head's d weights with model.head=scalar); MTP excluded
mtp_params     MTP modules (their embedding and head are shared, so not counted again)
mtp_params_stored  the same plus the copies of embedding and head that released checkpoints
               store inside each MTP layer (DeepSeek-V3's "685B" counts these)
active_params  parameters touched per token: total minus the unselected fraction
               (1 - K_r / N_r) of every main-model MoE layer's routed experts
kv_cache_bytes_per_token   L (d_c + d_h^R) * 2 bytes: MLA's latent cache in bf16
flops_per_token  6 N_act + 3 L n_h (d_qk + d_v) T: training FLOPs per token with N_act the
               active non-embedding parameters (head included) and the causal attention term
               (QK^T and AV over T/2 keys on average, forward + backward) at sequence length T
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from frontier_jax.model.config import ModelConfig
from frontier_jax.model.factory import build_model


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def describe(cfg: ModelConfig, seq_len: int = 4096, *, params: nnx.State | None = None) -> dict:
    """The figures of the module docstring.  params: the model's parameters as shapes when at
    hand (`runtime.ModelProgram.abstract_params`), else built abstractly by `build_model`."""
    if params is None:
        params = nnx.state(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mtp = _count(params["mtp"]) if "mtp" in params else 0
    total = _count(params) - mtp
    embedding = _count(params["embed"])
    routed = 0
    if "moe_layers" in params:
        routed = _count(params["moe_layers"]["blocks"]["ffn"]["experts"])
    inactive = routed * (1 - cfg.num_experts_per_tok / cfg.n_routed_experts)
    head = embedding if cfg.tie_embeddings else _count(params["head"]) if "head" in params else 0
    active = int(total - inactive)
    active_non_embedding = active - (0 if cfg.tie_embeddings else embedding)
    attention_flops = 3 * cfg.num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return {
        "name": cfg.name,
        "total_params": total,
        "mtp_params": mtp,
        "total_params_with_mtp": total + mtp,
        "mtp_params_stored": mtp + cfg.mtp_depth * (embedding + head),
        "active_params": active,
        "active_non_embedding_params": active_non_embedding,
        "embedding_params": embedding,
        "kv_cache_bytes_per_token": cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2,
        "seq_len": seq_len,
        "flops_per_token": 6 * active_non_embedding + attention_flops,
    }


def format_description(d: dict) -> str:
    def b(n):
        return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.1f}M"

    return "\n".join(
        [
            f"model {d['name']}",
            f"  total parameters (main model)   {b(d['total_params'])}  ({d['total_params']:,})",
            f"  MTP parameters                  {b(d['mtp_params'])}  (with MTP: {b(d['total_params_with_mtp'])}; "
            f"{b(d['total_params'] + d['mtp_params_stored'])} as stored, with MTP's embedding/head copies)",
            f"  activated per token             {b(d['active_params'])}  "
            f"(non-embedding: {b(d['active_non_embedding_params'])})",
            f"  latent KV cache per token       {d['kv_cache_bytes_per_token']:,} bytes (bf16, all layers)",
            f"  training FLOPs per token        {d['flops_per_token'] / 1e9:,.3f} GFLOP at seq {d['seq_len']}",
        ]
    )
