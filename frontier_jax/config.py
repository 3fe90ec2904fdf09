"""The resolved run configuration: the packages' typed config dataclasses (`model.config`: model and impl,
`data.config`, `train.config`, `infer.config`, `serve.config`, `parallel.config`,
`precision.config`, `runtime.expert_ledger`, `posttrain.config`) composed into one
`Config`, loaded from YAML files and dotted command-line overrides (OmegaConf structured
configs).  It only composes: each section's fields and checks live with its package.

A YAML file may list other YAML files under `include:` (paths relative to it); they are merged
first, in order, then the file itself, then the overrides (`train.steps=100`).  Unknown keys
and wrongly typed values are rejected with the key named; every section is then validated.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from frontier_jax.data.config import DataConfig
from frontier_jax.eval.config import EvalConfig
from frontier_jax.infer.config import InferConfig
from frontier_jax.model.config import AttentionImpl, ImplConfig, ModelConfig
from frontier_jax.parallel.config import MeshAxes, MeshConfig
from frontier_jax.parallel.pipeline.plan import pipeline_plan
from frontier_jax.posttrain.config import GRPOConfig
from frontier_jax.precision import get_policy
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.expert_ledger import ExpertsConfig
from frontier_jax.serve.config import ServeConfig
from frontier_jax.train.config import CheckpointConfig, TrainConfig

__all__ = [
    "CONFIG_DIR",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "EvalConfig",
    "ExpertsConfig",
    "GRPOConfig",
    "ImplConfig",
    "InferConfig",
    "MeshAxes",
    "MeshConfig",
    "ModelConfig",
    "PrecisionConfig",
    "ServeConfig",
    "TrainConfig",
    "load_config",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Implementation choices that left the `model:` section for `impl:` (named in the error)
_MOVED = {
    "model.attention_impl": "impl.attention",
    "model.gmm_impl": "impl.gmm",
    "model.moe_dispatch": "impl.moe_dispatch",
    "model.moe_capacity_factor": "impl.moe_capacity_factor",
    "model.ep_overlap_chunks": "impl.ep_overlap_chunks",
    "model.remat_policy": "impl.remat",
}
# OmegaConf's message for a value outside an Enum field's members
_BAD_CHOICE = re.compile(r"Invalid value '(?P<value>.*)', expected one of \[(?P<allowed>.*)\]")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    impl: ImplConfig = field(default_factory=ImplConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        pipeline_plan(
            self.train, self.mesh, self.model
        )  # mesh.stage, train.pipeline and the model's layers together
        _check_attention_dtype(self.impl.attention, self.precision.policy)
        return self

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self), enum_to_str=True)

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _check_attention_dtype(attention: AttentionImpl, policy) -> None:
    """cuDNN's fused attention takes 16-bit (or fp8) queries only: refuse an fp32 policy with it
    here, not as a NotImplementedError from inside the compiled step."""
    dtype = get_policy(policy).compute_dtype
    if attention == AttentionImpl.cudnn and jnp.dtype(dtype).itemsize > 2:
        raise ValueError(
            f"impl.attention=cudnn needs a 16-bit compute dtype, but precision.policy={str(policy)!r} computes "
            f"in {jnp.dtype(dtype).name}: use precision.policy=bf16 (or an fp8 policy), or "
            "impl.attention=xla / tokamax"
        )


def _load_yaml_with_includes(path: Path, seen: tuple[Path, ...] = ()):
    """The merged mapping of the YAML file `path` and its includes; `seen`: the files that
    include it, outermost first."""
    path = path.resolve()
    if not path.is_file():
        if seen:
            raise FileNotFoundError(
                f"config file {seen[-1]} includes {path}, which does not exist: fix its include: list"
            )
        raise FileNotFoundError(f"config file {path} does not exist")
    if path in seen:
        raise ValueError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(
            f"config file {path}: YAML syntax error{where}: "
            f"{getattr(err, 'problem', None) or err}; fix the file"
        ) from err
    if not isinstance(raw, DictConfig):
        raise ValueError(
            f"config file {path}: the top level is a list, not a mapping of sections (model:, train:, ...)"
        )
    if not raw:
        raise ValueError(
            f"config file {path} is empty: give it sections (model:, train:, ...) or an include: list"
            + (f" (it is included by {seen[-1]})" if seen else "")
        )
    includes = raw.pop("include", []) or []
    if not isinstance(includes, (list, ListConfig)) or not all(isinstance(i, str) for i in includes):
        raise ValueError(
            f"config file {path}: include={includes!r} must be a list of YAML paths, "
            "e.g. include: [../model/toy.yaml]"
        )
    parts = [_load_yaml_with_includes(path.parent / inc, seen + (path,)) for inc in includes]
    return OmegaConf.merge(*parts, raw) if parts else raw


def resolve_config_path(name: str) -> Path:
    """A path, or a short name like `train/toy` looked up under configs/."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"config {name!r} not found (looked at {path} and {candidate})")


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """YAML file(s) + dotted overrides -> validated `Config`."""
    try:
        merged = OmegaConf.structured(Config)
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml_with_includes(resolve_config_path(path)))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ValueError(f"override {bad[0]!r} is not of the form key=value (e.g. train.steps=100)")
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
            except TypeError as err:  # e.g. data.sources.0.weight=0.5: a dotlist cannot index a list
                raise ValueError(
                    f"overrides {' '.join(overrides)}: {err}; a list (e.g. data.sources) is "
                    "replaced whole: give it in a YAML file"
                ) from err
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        choice = _BAD_CHOICE.match(str(err))
        if key in _MOVED:
            raise ValueError(
                f"{key} is now {_MOVED[key]} (implementation choices have their own impl: section)"
            ) from None
        if key and choice:  # a closed choice (an Enum field)
            raise ValueError(
                f"{key}={choice['value']!r} is invalid: allowed values are {choice['allowed']}"
            ) from None
        raise ValueError(
            f"invalid config{f' key {key!r}' if key else ''}: {err}".split("\n")[0]
            + " (fields and types: each package's config.py, e.g. frontier_jax/train/config.py)"
        ) from err
    return cfg.validate()
