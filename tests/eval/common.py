"""The tiny model shared by the evaluation tests (8 routed experts so that expert-parallel
layouts split them; a dense prefix layer and a MoE layer)."""

from __future__ import annotations

TINY_MODEL = [
    "model.vocab_size=272",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.first_k_dense=1",
    "model.dense_ffn_dim=64",
    "model.num_heads=2",
    "model.q_lora_rank=16",
    "model.kv_lora_rank=16",
    "model.qk_nope_head_dim=8",
    "model.qk_rope_head_dim=4",
    "model.v_head_dim=8",
    "model.n_routed_experts=8",
    "model.n_shared_experts=1",
    "model.num_experts_per_tok=2",
    "model.moe_ffn_dim=16",
    "model.n_group=2",
    "model.topk_group=1",
    "model.mtp_depth=1",
]

DOCUMENTS = [  # the third is longer than the 16-pair window of the tests
    "Q: 3 + 4 = ?\nA: 7\n",
    "x",
    "def f(a, b):\n    return a * b + (a - b) // 2\n",
    "héllo wörld",
]
