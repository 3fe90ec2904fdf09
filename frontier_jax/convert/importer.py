"""`from_hf`: a Hugging Face DeepseekV3/V2 safetensors checkpoint -> (ModelConfig, Transformer).

The model is built abstractly (`nnx.eval_shape`: no random init of the weights); each variable
gets a host buffer that is filled layer by layer as checkpoint tensors are read one at a time
(dequantising block-scaled fp8, see `fp8.py`), then moved into the model.  Layer i of the
checkpoint lands in `dense_layers.blocks[i]` (i < first_k_dense) or
`moe_layers.blocks[i - first_k_dense]`; MTP module k comes from layer num_hidden_layers + k - 1.

Strictness: a checkpoint tensor with the wrong shape, a tensor the model needs but the
checkpoint lacks, and a checkpoint tensor nothing reads are all errors.  Not counted as unread:
rotary `inv_freq` buffers and MTP layers beyond the imported depth (HF's own model reads no
MTP layer).  The MTP depth imported is the configured `num_nextn_predict_layers` lowered to the
number of consecutive MTP layers present -- transformers' `save_pretrained` writes
num_nextn_predict_layers = 1 without MTP weights, and such checkpoints import with
mtp_depth = 0.  `config_overrides` (ModelConfig fields) are applied last, e.g.
{"mtp_depth": 0} to drop MTP layers or {"attention_impl": "cudnn"}.
"""

from __future__ import annotations

import os
import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from frontier_jax.convert import layout
from frontier_jax.convert.fp8 import DEFAULT_BLOCK, dequantize_blocks, fp8_block_size
from frontier_jax.convert.hf_config import hf_config_to_model_config, rope_interleaved
from frontier_jax.convert.safetensors_io import CheckpointReader, read_json
from frontier_jax.model.config import ModelConfig
from frontier_jax.model.transformer import Transformer
from frontier_jax.precision import get_policy

DTYPE_POLICIES = {"float32": "fp32", "bfloat16": "bf16"}
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_STACKS = ("dense_layers", "moe_layers", "mtp")  # variables with a leading layer/depth axis


class _Source:
    """Checkpoint tensors as float32, with shape checks, fp8 dequantisation and bookkeeping of
    the tensors read and of those asked for but absent."""

    def __init__(self, reader: CheckpointReader, fp8_block: tuple[int, int] | None):
        self.reader, self.fp8_block = reader, fp8_block
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.reader:
            self.missing.append(name)
            return np.zeros(shape, np.float32)
        found = self.reader.shape(name)
        if found != tuple(shape):
            raise ValueError(f"HF tensor {name}: expected shape {tuple(shape)}, found {found}")
        self.used.add(name)
        value = self.reader.read(name)
        scale_name = f"{name}_scale_inv"
        if scale_name in self.reader:
            self.used.add(scale_name)
            block = self.fp8_block or DEFAULT_BLOCK
            return dequantize_blocks(value, self.reader.read(scale_name), block, name)
        if value.dtype in _FP8:
            raise ValueError(f"HF tensor {name} is fp8 but the checkpoint has no {scale_name}")
        return value.astype(np.float32, copy=False)


def _ignorable(name: str, cfg: ModelConfig) -> bool:
    if name.endswith("rotary_emb.inv_freq"):
        return True
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    return layer is not None and int(layer.group(1)) >= cfg.num_layers + cfg.mtp_depth


def _read_params(src: _Source, cfg: ModelConfig, interleaved: bool):
    """Yields (our variable path, layer index or None, value) for every model variable."""
    for path, value in layout.top_from_hf(src, cfg).items():
        yield path, None, value
    for i in range(cfg.num_layers):
        moe = i >= cfg.first_k_dense
        root, index = ((("moe_layers", "blocks"), i - cfg.first_k_dense) if moe
                       else (("dense_layers", "blocks"), i))
        for path, value in layout.block_from_hf(src, f"model.layers.{i}.", cfg, interleaved, moe).items():
            yield root + path, index, value
    for k in range(cfg.mtp_depth):
        p = f"model.layers.{cfg.num_layers + k}."
        for path, value in layout.mtp_from_hf(src, p, cfg, interleaved).items():
            yield ("mtp", "modules") + path, k, value


def _listing(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_copies(src: _Source, buffers: dict, cfg: ModelConfig) -> None:
    """The copies a checkpoint may hold -- lm_head when tied, each MTP layer's embed_tokens
    and shared_head.head -- must equal the shared embedding / head."""
    top = layout.top_to_hf({p: v for p, v in buffers.items() if p[0] in layout.TOP_LEVEL}, cfg)
    head = layout.hf_head(top, cfg)
    copies = {"lm_head.weight": head} if cfg.tie_embeddings else {}
    for k in range(cfg.mtp_depth):
        p = f"model.layers.{cfg.num_layers + k}."
        copies.update(layout.mtp_copies(p, top["model.embed_tokens.weight"], head))
    for name, expected in copies.items():
        if name in src and not np.array_equal(src.get(name, expected.shape), expected):
            raise ValueError(f"HF tensor {name} should be a copy of the shared embedding/output head "
                             "but differs from it")


def _load_config(path: str, reader: CheckpointReader, overrides: dict | None) -> tuple[dict, ModelConfig]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"HF checkpoint directory {path} has no config.json")
    hf_config = read_json(config_path, "the model config")
    try:
        cfg = hf_config_to_model_config(hf_config)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from err
    depth = 0  # consecutive MTP layers present, up to the configured depth
    while depth < cfg.mtp_depth and f"model.layers.{cfg.num_layers + depth}.eh_proj.weight" in reader:
        depth += 1
    cfg = cfg.replace(name=os.path.basename(os.path.normpath(path)), mtp_depth=depth)
    return hf_config, cfg.replace(**(overrides or {}))


def from_hf(path: str, dtype: str = "float32", *, config_overrides: dict | None = None
            ) -> tuple[ModelConfig, Transformer]:
    """Imports the checkpoint directory `path` (config.json + safetensors, sharded or not).
    dtype "float32" / "bfloat16" picks the precision policy (fp32 / bf16 compute; master
    weights stay float32)."""
    if dtype not in DTYPE_POLICIES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPE_POLICIES)}")
    reader = CheckpointReader(path)
    hf_config, cfg = _load_config(path, reader, config_overrides)
    policy = get_policy(DTYPE_POLICIES[dtype])
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, policy=policy, rngs=nnx.Rngs(0))))
    variables = dict(nnx.to_flat_state(state))
    buffers = {p: np.empty(var.shape, var.dtype) for p, var in variables.items()}
    filled: dict[tuple, set] = {p: set() for p in variables}  # layer indices written (None: unstacked)

    src = _Source(reader, fp8_block_size(hf_config))
    for var_path, index, value in _read_params(src, cfg, rope_interleaved(hf_config)):
        if var_path not in buffers:
            raise ValueError(f"the converter produced {'.'.join(var_path)}, which the model lacks")
        target = buffers[var_path] if index is None else buffers[var_path][index]
        if value.shape != target.shape:
            raise ValueError(f"{'.'.join(var_path)}: expected shape {target.shape}, converted {value.shape}")
        target[...] = value
        filled[var_path].add(index)
    _check_copies(src, buffers, cfg)

    if src.missing:
        raise ValueError(f"the checkpoint lacks {len(src.missing)} tensor(s) the model needs: "
                         + _listing(src.missing))
    unfilled = [".".join(p) for p, got in filled.items()
                if got != (set(range(variables[p].shape[0])) if p[0] in _STACKS else {None})]
    if unfilled:
        raise ValueError(f"model variable(s) not filled from the checkpoint: {_listing(unfilled)}")
    unused = sorted(n for n in reader.names() - src.used if not _ignorable(n, cfg))
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensor(s) are not used by the model: {_listing(unused)}")
    for var_path, var in variables.items():
        var.set_value(jnp.asarray(buffers[var_path]))
    return cfg, nnx.merge(graphdef, state)
