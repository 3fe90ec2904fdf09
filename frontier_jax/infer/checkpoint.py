"""Parameters-only load of a training run's checkpoint (minimal local loader, to be replaced by
the shared `frontier_jax.runtime.restore.restore_params` once it exists)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from omegaconf import OmegaConf

from frontier_jax.data.config import DataConfig
from frontier_jax.infer.config import InferConfig
from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.model.routing import ExpertBias
from frontier_jax.precision import get_policy


def _directory(path: Path) -> tuple[Path, int | None]:
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    raise ValueError(f"--checkpoint {path}: no checkpoint there; give a run directory holding "
                     "checkpoints/<step>/ or one checkpoints/<step>/ directory")


def _section(cls, saved: dict, name: str):
    """The saved config's section `name` as a validated `cls`."""
    section = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), saved.get(name) or {}))
    section.validate()
    return section


def load_checkpoint(run_dir: str, step: int | None = None, *, dtype=None
                    ) -> tuple[Transformer, DataConfig, InferConfig]:
    """(the model with the checkpoint's parameters and expert biases, the run's data and infer
    config sections); the optimizer state is not read.  dtype (e.g. "bfloat16"): the compute
    precision policy (default: the run's precision.policy)."""
    directory, step_in_path = _directory(Path(run_dir))
    step = step_in_path if step is None else step
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(directory.resolve(), options=options) as manager:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ValueError(f"no checkpoint in {directory}: it holds no <step>/ directory")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ValueError(f"no checkpoint of step {step} in {directory}; its steps: {', '.join(map(str, steps))}")
        saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        model_cfg = _section(ModelConfig, saved, "model")
        policy = get_policy(saved["precision"]["policy"] if dtype is None
                            else {"float32": "fp32", "bfloat16": "bf16"}[jnp.dtype(dtype).name])
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, policy=policy, rngs=nnx.Rngs(0)))
        graphdef, params, biases = nnx.split(abstract, nnx.Param, ExpertBias)
        target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                              {"params": nnx.to_pure_dict(params), "biases": nnx.to_pure_dict(biases)})
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True))).state
    nnx.replace_by_pure_dict(params, state["params"])
    nnx.replace_by_pure_dict(biases, state["biases"])
    return (nnx.merge(graphdef, params, biases), _section(DataConfig, saved, "data"),
            _section(InferConfig, saved, "infer"))
