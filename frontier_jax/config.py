"""The resolved run configuration: typed dataclasses composed from YAML files and dotted
command-line overrides (OmegaConf structured configs).

A YAML file may list other YAML files under `include:` (paths relative to it); they are merged
first, in order, then the file itself, then the overrides (`train.steps=100`).  Unknown keys
and wrongly typed values are rejected with the key named; every section is then validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from frontier_jax.data.config import DataConfig
from frontier_jax.infer.config import InferConfig
from frontier_jax.model.config import ModelConfig
from frontier_jax.precision import POLICIES

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEDULES = ("constant", "cosine", "deepseek")
MOMENT_DTYPES = ("float32", "bfloat16")
NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class TrainConfig:
    """Optimisation.  lr schedule "deepseek" = linear warmup -> constant peak until
    `decay_start` -> cosine to `lr_min` over `decay_steps` -> constant `lr_min` (V3 report
    Sec. 4.2 shape); "cosine" = warmup -> cosine to lr_min at `steps`."""

    steps: int = 300
    seed: int = 0
    seq_len: int = 128
    global_batch: int = 16
    micro_batches: int = 1  # gradient accumulation: global_batch is split into this many
    lr: float = 3e-3
    lr_min: float = 3e-4
    schedule: str = "cosine"
    warmup_steps: int = 20
    decay_start: int = 0  # "deepseek" schedule: step where cosine decay begins
    decay_steps: int = 0  # "deepseek" schedule: length of the cosine decay
    batch_ramp_steps: int = 0  # batch-size ramp: grow from batch_ramp_start to global_batch
    batch_ramp_start: int = 0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    moment_dtype: str = "float32"
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_speed: float = 1e-3  # gamma of auxiliary-loss-free balancing
    z_loss: float = 0.0
    on_nonfinite: str = "stop"
    log_every: int = 1

    def validate(self) -> "TrainConfig":
        for name in ("steps", "seq_len", "global_batch", "micro_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name}={getattr(self, name)} must be > 0")
        if self.global_batch % self.micro_batches:
            raise ValueError(f"train.global_batch={self.global_batch} is not divisible by "
                             f"train.micro_batches={self.micro_batches}; pick a divisor")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"train.schedule={self.schedule!r}: allowed values are {', '.join(SCHEDULES)}")
        if self.moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"train.moment_dtype={self.moment_dtype!r}: allowed {', '.join(MOMENT_DTYPES)}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"train.on_nonfinite={self.on_nonfinite!r}: allowed {', '.join(NONFINITE_POLICIES)}")
        if self.lr <= 0 or self.lr_min < 0 or self.lr_min > self.lr:
            raise ValueError(f"train.lr={self.lr} / train.lr_min={self.lr_min}: need 0 <= lr_min <= lr, lr > 0")
        if self.warmup_steps < 0 or self.decay_start < 0 or self.decay_steps < 0:
            raise ValueError("train.warmup_steps, train.decay_start and train.decay_steps must be >= 0")
        if self.schedule == "deepseek" and not self.decay_steps:
            raise ValueError("train.decay_steps=0 with train.schedule='deepseek' would drop the lr from its peak "
                             "to lr_min in one step; set train.decay_steps to the cosine's length (V3: about "
                             "a third of training), or use train.schedule=cosine")
        if self.batch_ramp_steps:
            if not 0 < self.batch_ramp_start <= self.global_batch:
                raise ValueError(f"train.batch_ramp_start={self.batch_ramp_start} must be in "
                                 f"(0, train.global_batch={self.global_batch}] when batch_ramp_steps > 0")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        return self


@dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps (0 = only at the end)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True

    def validate(self) -> "CheckpointConfig":
        if self.every < 0:
            raise ValueError(f"checkpoint.every={self.every} must be >= 0")
        if self.keep <= 0:
            raise ValueError(f"checkpoint.keep={self.keep} must be > 0")
        return self


@dataclass
class MeshAxes:
    """A size per mesh axis."""

    stage: int = 1
    data: int = 1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


@dataclass
class MeshConfig:
    """Device mesh axis sizes (their product must equal the device count).

    `dcn` gives, per axis, the factor of its size that spans slices / hosts over the slow
    data-centre network (DCN); the rest of each axis lies within a slice or node (ICI /
    NVLink).  `rules` names the logical-axis -> mesh-axis table (`frontier_jax.parallel.rules`).
    """

    stage: int = 1
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn: MeshAxes = field(default_factory=MeshAxes)
    rules: str = "default"

    def validate(self) -> "MeshConfig":
        from frontier_jax.parallel.rules import RULE_SETS

        for name in ("stage", "fsdp", "expert", "tensor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"mesh.{name}={getattr(self, name)} must be > 0")
        if self.data == 0 or self.data < -1:
            raise ValueError(f"mesh.data={self.data} must be > 0 or -1 (use the remaining devices)")
        for name in ("stage", "data", "fsdp", "expert", "tensor"):
            factor, size = getattr(self.dcn, name), getattr(self, name)
            if factor <= 0:
                raise ValueError(f"mesh.dcn.{name}={factor} must be > 0")
            if size != -1 and size % factor:
                raise ValueError(f"mesh.dcn.{name}={factor} must divide mesh.{name}={size}")
        if self.rules not in RULE_SETS:
            raise ValueError(f"mesh.rules={self.rules!r} is unknown; allowed: {', '.join(RULE_SETS)}")
        return self


@dataclass
class PrecisionConfig:
    policy: str = "fp32"

    def validate(self) -> "PrecisionConfig":
        if self.policy not in POLICIES:
            raise ValueError(f"precision.policy={self.policy!r}: allowed values are {', '.join(POLICIES)}")
        return self


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    infer: InferConfig = field(default_factory=InferConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        return self

    def to_dict(self) -> dict:
        return OmegaConf.to_container(OmegaConf.structured(self))

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(OmegaConf.structured(self))


def _load_yaml_with_includes(path: Path, seen: tuple[Path, ...] = ()):
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path in seen:
        raise ValueError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config file {path}: YAML syntax error{where}: "
                         f"{getattr(err, 'problem', None) or err}; fix the file") from err
    if not isinstance(raw, DictConfig):
        raise ValueError(f"config file {path}: the top level is a list, not a mapping of "
                         "sections (model:, train:, ...)")
    includes = raw.pop("include", []) or []
    if not isinstance(includes, (list, ListConfig)) or not all(isinstance(i, str) for i in includes):
        raise ValueError(f"config file {path}: include={includes!r} must be a list of YAML paths, "
                         "e.g. include: [../model/toy.yaml]")
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
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ValueError(f"invalid config{f' key {key!r}' if key else ''}: {err}".split("\n")[0]
                         + " (fields and types: the dataclasses in frontier_jax/config.py)") from err
    return cfg.validate()
