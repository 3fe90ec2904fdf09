"""The model under evaluation: a training checkpoint (parameters-only restore) or a Hugging
Face directory (streamed import), on the evaluation mesh, with its tokenizer, computed with
dropless expert dispatch unless impl.* set at load says otherwise (`runtime.program.inference_impl`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from flax import nnx

from frontier_jax.convert import from_hf
from frontier_jax.convert.importer import DTYPE_POLICIES
from frontier_jax.data.tokenizer import Tokenizer, load_tokenizer, run_tokenizer
from frontier_jax.model.config import ImplConfig
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.program import ModelProgram, ModelSections, build_model_program, inference_impl
from frontier_jax.runtime.restore import restore_params


@dataclasses.dataclass(frozen=True)
class EvalModel:
    program: ModelProgram
    params: dict
    biases: dict
    tokenizer: Tokenizer
    source: str  # the checkpoint / HF path
    step: int | None  # the checkpoint's step (None for a HF directory)
    config: dict  # the checkpoint's saved run config, or {"model": ...} of a HF import
    train_seq_len: int


def _checkpoint_model_matches(saved: dict, model_overrides: dict, where: str) -> None:
    for key, value in model_overrides.items():
        if saved.get("model", {}).get(key) != value:
            raise ValueError(
                f"model.{key}={value!r} does not match the checkpoint in {where} "
                f"(model.{key}={saved.get('model', {}).get(key)!r}); drop the override"
            )


def _devices(count: int | None) -> list:
    devices = jax.devices()
    if count is not None and not 0 < count <= len(devices):
        raise ValueError(f"--devices {count}: must be in [1, {len(devices)}] (the devices of this run)")
    return devices[:count] if count else devices


def load_checkpoint(
    path: str,
    step: int | None,
    *,
    mesh: MeshConfig,
    dtype: str | None,
    model_overrides: dict | None = None,
    devices: int | None = None,
    impl: dict | None = None,
) -> EvalModel:
    """Parameters of `path` (a run dir, its checkpoints/ or one checkpoints/<step>/) on `mesh` over
    the first `devices` devices (default all); impl: impl.* choices given at load."""
    restored = restore_params(
        path, step, mesh=build_mesh(mesh.validate(), _devices(devices)), dtype=dtype, impl=impl
    )
    _checkpoint_model_matches(restored.config, model_overrides or {}, path)
    tokenizer = run_tokenizer(restored.config, restored.trained())
    seq_len = restored.config.get("train", {}).get("seq_len", 128)
    return EvalModel(
        restored.program,
        restored.params,
        restored.biases,
        tokenizer,
        str(path),
        restored.step,
        restored.config,
        seq_len,
    )


def load_hf(
    path: str,
    *,
    mesh: MeshConfig,
    dtype: str | None,
    tokenizer: str | None = None,
    devices: int | None = None,
    impl: dict | None = None,
) -> EvalModel:
    """A Hugging Face DeepseekV3 directory; tokenizer: its tokenizer.json unless given; impl:
    impl.* choices given at load."""
    dtype = dtype or "float32"
    device_mesh = build_mesh(mesh.validate(), _devices(devices))
    from frontier_jax.parallel.rules import RULE_SETS

    impl = inference_impl(ImplConfig(), impl)
    model_cfg, model = from_hf(path, dtype=dtype, mesh=device_mesh, rules=RULE_SETS[mesh.rules], impl=impl)
    program = build_model_program(
        ModelSections(model_cfg, mesh, PrecisionConfig(policy=DTYPE_POLICIES[dtype]), impl), mesh=device_mesh
    )
    _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
    if tokenizer is None:
        local = Path(path) / "tokenizer.json"
        tokenizer = str(local) if local.is_file() else "byte"
    config = {"model": dataclasses.asdict(model_cfg), "data": {"tokenizer": tokenizer}}
    return EvalModel(
        program,
        nnx.to_pure_dict(params),
        nnx.to_pure_dict(biases),
        load_tokenizer(tokenizer),
        str(path),
        None,
        config,
        model_cfg.max_position_embeddings,
    )
