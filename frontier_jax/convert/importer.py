"""`from_hf`: a Hugging Face DeepseekV3/V2 safetensors checkpoint -> (ModelConfig, Transformer).

The model is built abstractly (`nnx.eval_shape`: no random init of the weights), then streamed:
each parameter is read from the checkpoint (safetensors memory-mapped, one tensor at a time),
converted (float32, block-scaled fp8 dequantised, see `fp8.py`; layout, see `layout.py`; cast to
the variable's dtype) and placed directly with its target sharding by
`jax.make_array_from_callback`, each device shard computed from the checkpoint tensors it needs
(a shard of a routed-expert stack reads only its experts).  Stacked variables ([layers, ...])
are created on the devices and filled one layer at a time by a donated in-place update, so the
host holds a few tensors of one layer at any time, never the model, and a model larger than one
device imports onto a mesh.  Layer i of the checkpoint lands in `dense_layers.blocks[i]`
(i < first_k_dense) or `moe_layers.blocks[i - first_k_dense]`; MTP module k comes from layer
num_hidden_layers + k - 1.

Strictness: a checkpoint tensor with the wrong shape, a tensor the model needs but the
checkpoint lacks, and a checkpoint tensor nothing reads are all errors.  Not counted as unread:
rotary `inv_freq` buffers and MTP layers beyond the imported depth (HF's own model reads no
MTP layer).  The MTP depth imported is the configured `num_nextn_predict_layers` lowered to the
number of consecutive MTP layers present -- transformers' `save_pretrained` writes
num_nextn_predict_layers = 1 without MTP weights, and such checkpoints import with
mtp_depth = 0.  `config_overrides` (ModelConfig fields) are applied last, e.g.
{"mtp_depth": 0} to drop MTP layers; `impl` (an `ImplConfig`) picks how the model computes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import (
    AxisType,
    Mesh,
    NamedSharding,
    PartitionSpec,
    Sharding,
    SingleDeviceSharding,
)

from frontier_jax.convert import layout
from frontier_jax.convert.fp8 import DEFAULT_BLOCK, dequantize_blocks, fp8_block_size
from frontier_jax.convert.hf_config import hf_config_to_model_config, rope_interleaved
from frontier_jax.convert.safetensors_io import CheckpointReader, read_json
from frontier_jax.model import ModelConfig, Transformer, build_model
from frontier_jax.model.config import ImplConfig
from frontier_jax.parallel.mesh import check_divisible, state_shardings
from frontier_jax.parallel.rules import DEFAULT_RULES
from frontier_jax.precision import get_policy

DTYPE_POLICIES = {"float32": "fp32", "bfloat16": "bf16"}
_FP8 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.float8_e5m2))
_STACKS = ("dense_layers", "moe_layers", "mtp")  # variables with a leading layer/depth axis


class _Source:
    """Checkpoint tensors as float32, with shape checks, fp8 dequantisation and bookkeeping of
    the tensors read and of those asked for but absent.  The last tensor read is kept, so the
    parameters cut from one tensor (e.g. wkv_a and wk_rope) read it once."""

    def __init__(self, reader: CheckpointReader, fp8_block: tuple[int, int] | None):
        self.reader, self.fp8_block = reader, fp8_block
        self.used: set[str] = set()
        self.missing: set[str] = set()
        self._last: tuple[str, np.ndarray] | None = None

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.reader:
            self.missing.add(name)
            return np.zeros(shape, np.float32)
        found = self.reader.shape(name)
        if found != tuple(shape):
            raise ValueError(f"HF tensor {name}: expected shape {tuple(shape)}, found {found}")
        if self._last is None or self._last[0] != name:
            self._last = None  # free the previous tensor before reading the next one
            self._last = (name, self._read(name))
        return self._last[1]

    def _read(self, name: str) -> np.ndarray:
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
        root, index = (
            (("moe_layers", "blocks"), i - cfg.first_k_dense) if moe else (("dense_layers", "blocks"), i)
        )
        for path, value in layout.block_from_hf(src, f"model.layers.{i}.", cfg, interleaved, moe).items():
            yield root + path, index, value
    for k in range(cfg.mtp_depth):
        p = f"model.layers.{cfg.num_layers + k}."
        for path, value in layout.mtp_from_hf(src, p, cfg, interleaved).items():
            yield ("mtp", "modules") + path, k, value


def _listing(names: list[str], limit: int = 20) -> str:
    return ", ".join(names[:limit]) + (f" ... ({len(names) - limit} more)" if len(names) > limit else "")


def _check_copies(src: _Source, cfg: ModelConfig) -> None:
    """The copies a checkpoint may hold -- lm_head when tied, each MTP layer's embed_tokens
    and shared_head.head -- must equal the shared embedding / head."""
    for name, original in layout.hf_copies(cfg).items():
        if name in src and original in src:
            shape = src.reader.shape(original)
            if not np.array_equal(np.array(src.get(name, shape)), src.get(original, shape)):
                raise ValueError(
                    f"HF tensor {name} should be a copy of the shared embedding/output head "
                    "but differs from it"
                )


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


def _dtype_name(dtype) -> str:
    """ "float32" / "bfloat16" from a name or a dtype object (jnp.float32, np.dtype, ...)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPE_POLICIES:
        raise ValueError(
            f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPE_POLICIES)} (as a string or a dtype)"
        )
    return name


def _layer_sharding(sharding: Sharding) -> Sharding:
    """The sharding of one layer [...] of a stacked variable [layers, ...] sharded by `sharding`."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
    return sharding


@functools.cache
def _zeros(shape: tuple[int, ...], dtype, sharding: Sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.cache
def _write_layer(sharding: Sharding):
    """stack [L, ...], layer [...], i -> stack with stack[i] = layer, in place (stack donated)."""
    return jax.jit(
        lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
        donate_argnums=0,
        out_shardings=sharding,
    )


def _place(value: layout.Lazy, shape: tuple[int, ...], dtype, sharding: Sharding, what: str) -> jax.Array:
    """`value` (of `shape`) as a jax.Array with `sharding`, each addressable shard computed alone
    (through `value.rows` when it can read only the rows of its shard)."""
    computed: dict = {}  # the last rows computed, for the shards that share them

    def rows(index: tuple[slice, ...]) -> np.ndarray:
        part = index[0] if index and value.rows is not None else slice(None)
        key = part.indices(shape[0]) if shape else ()
        if key not in computed:
            computed.clear()
            array = value.whole() if part == slice(None) else value.rows(part)
            expected = (len(range(*key)), *shape[1:]) if shape else ()
            if array.shape != expected:
                raise ValueError(f"{what}: expected shape {expected}, converted {array.shape}")
            computed[key] = array
        sub = computed[key][(slice(None), *index[1:]) if part != slice(None) else index]
        return np.asarray(sub, dtype)

    return jax.make_array_from_callback(shape, sharding, rows)


def from_hf(
    path: str,
    *,
    dtype="float32",
    mesh: Mesh | None = None,
    rules: Mapping[str, Sequence[str]] | None = None,
    config_overrides: dict | None = None,
    impl: ImplConfig = ImplConfig(),
) -> tuple[ModelConfig, Transformer]:
    """Imports the checkpoint directory `path` (config.json + safetensors, sharded or not).

    dtype: "float32" / "bfloat16" (or jnp.float32 / jnp.bfloat16) picks the precision policy
      (fp32 / bf16 compute; master weights stay float32).
    mesh, rules: parameters are placed with the NamedShardings of their logical axes under
      `rules` (default `parallel.rules.DEFAULT_RULES`) on `mesh` (Auto axes, as
      `parallel.mesh.build_mesh` makes it); without a mesh, on the default device.
    """
    name = _dtype_name(dtype)
    reader = CheckpointReader(path)
    hf_config, cfg = _load_config(path, reader, config_overrides)
    policy = get_policy(DTYPE_POLICIES[name])
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: build_model(cfg, impl=impl, policy=policy, rngs=nnx.Rngs(0)))
    )
    variables = dict(nnx.to_flat_state(state))
    if mesh is None:
        shardings = {p: SingleDeviceSharding(jax.devices()[0]) for p in variables}
    else:
        if any(t != AxisType.Auto for t in mesh.axis_types):
            raise ValueError(
                f"from_hf: mesh axis types {mesh.axis_types} are not all Auto; build the mesh "
                "with parallel.mesh.build_mesh (or jax.make_mesh(..., axis_types=Auto))"
            )
        rules = DEFAULT_RULES if rules is None else rules
        check_divisible(state, mesh, rules)
        shardings = nnx.traversals.flatten_mapping(state_shardings(state, mesh, rules))
    arrays: dict[tuple, jax.Array] = {}
    filled: dict[tuple, set] = {p: set() for p in variables}  # layer indices written (None: unstacked)

    src = _Source(reader, fp8_block_size(hf_config))
    for var_path, index, value in _read_params(src, cfg, rope_interleaved(hf_config)):
        if var_path not in variables:
            raise ValueError(f"the converter produced {'.'.join(var_path)}, which the model lacks")
        var, sharding, what = variables[var_path], shardings[var_path], ".".join(var_path)
        if index is None:
            arrays[var_path] = _place(value, var.shape, var.dtype, sharding, what)
        else:
            if var_path not in arrays:
                arrays[var_path] = _zeros(var.shape, var.dtype, sharding)()
            layer = _place(value, var.shape[1:], var.dtype, _layer_sharding(sharding), f"{what}[{index}]")
            arrays[var_path] = _write_layer(sharding)(arrays[var_path], layer, jnp.int32(index))
        filled[var_path].add(index)
    _check_copies(src, cfg)

    if src.missing:
        raise ValueError(
            f"the checkpoint lacks {len(src.missing)} tensor(s) the model needs: "
            + _listing(sorted(src.missing))
        )
    unfilled = [
        ".".join(p)
        for p, got in filled.items()
        if got != (set(range(variables[p].shape[0])) if p[0] in _STACKS else {None})
    ]
    if unfilled:
        raise ValueError(f"model variable(s) not filled from the checkpoint: {_listing(unfilled)}")
    unused = sorted(n for n in reader.names() - src.used if not _ignorable(n, cfg))
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensor(s) are not used by the model: {_listing(unused)}")
    for var_path, var in variables.items():
        var.set_value(arrays[var_path])
    return cfg, nnx.merge(graphdef, state)
