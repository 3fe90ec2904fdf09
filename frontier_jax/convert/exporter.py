"""`to_hf`: a Transformer -> a Hugging Face checkpoint directory in the released layout.

Writes config.json (`model_config_to_hf_config`) and safetensors shards (+ index when more
than one), tensors in the order embedding, layers 0 .. L-1, final norm, head, then MTP
module k as layer L + k - 1 with its copies of the embedding and head.  Rotary rows are
interleaved again for DeepseekV3 (rope_interleave true) and always for DeepseekV2; routed
experts are written per expert (`mlp.experts.{e}.*_proj.weight`), as released checkpoints and
transformers' `save_pretrained` store them.  `from_hf(to_hf(m))` reproduces m's parameters
exactly (float32 export).
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes
import numpy as np
from flax import nnx

from frontier_jax.convert import layout
from frontier_jax.convert.hf_config import model_config_to_hf_config, rope_interleaved
from frontier_jax.convert.safetensors_io import write_checkpoint
from frontier_jax.model.transformer import Transformer

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_FP32_TENSORS = ("e_score_correction_bias",)  # kept in float32 whatever the export dtype


def _layer(params: dict, root: tuple, index: int) -> layout.Params:
    """Layer `index` of the stacked variables under `root`, copied to host."""
    n = len(root)
    return {path[n:]: np.asarray(value[index]) for path, value in params.items() if path[:n] == root}


def _hf_tensors(model: Transformer, interleaved: bool) -> Iterator[tuple[str, np.ndarray]]:
    """HF (name, array) pairs; stacked variables come to host one layer at a time."""
    cfg = model.cfg
    params = {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model))}
    top = layout.top_to_hf({p: np.asarray(v) for p, v in params.items() if p[0] in layout.TOP_LEVEL}, cfg)
    yield "model.embed_tokens.weight", top["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        moe = i >= cfg.first_k_dense
        root, index = (
            (("moe_layers", "blocks"), i - cfg.first_k_dense) if moe else (("dense_layers", "blocks"), i)
        )
        layer = _layer(params, root, index)
        yield from layout.block_to_hf(layer, f"model.layers.{i}.", cfg, interleaved, moe).items()
    yield from ((name, value) for name, value in top.items() if name != "model.embed_tokens.weight")
    for k in range(cfg.mtp_depth):
        p = f"model.layers.{cfg.num_layers + k}."
        yield from layout.mtp_to_hf(_layer(params, ("mtp", "modules"), k), p, cfg, interleaved).items()
        yield from layout.mtp_copies(p, top["model.embed_tokens.weight"], layout.hf_head(top, cfg)).items()


def to_hf(model: Transformer, path: str, *, max_shard_bytes: int = 5 * 2**30, dtype: str = "float32") -> None:
    """Exports `model` into the new directory `path`; tensors in `dtype` ("float32" or
    "bfloat16"; the routing bias stays float32), shards of at most `max_shard_bytes`."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(EXPORT_DTYPES)}")
    hf_config = model_config_to_hf_config(model.cfg)
    hf_config["torch_dtype"] = dtype
    target = EXPORT_DTYPES[dtype]
    tensors = (
        (name, np.ascontiguousarray(value, np.float32 if name.endswith(_FP32_TENSORS) else target))
        for name, value in _hf_tensors(model, rope_interleaved(hf_config))
    )
    write_checkpoint(path, tensors, max_shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
