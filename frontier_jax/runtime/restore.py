"""Parameters-only restore: a training checkpoint's weights onto any mesh, in any dtype.

A training run directory holds orbax checkpoints `checkpoints/<step>/` with the items
    state    the train state, fields params, biases, opt_state, step, rng (`train.state.TrainState`)
    config   the resolved run config (JSON)
`restore_params` reads the config, builds the model program on the requested mesh and restores
only `state.params` and `state.biases` (orbax partial restore: the optimizer moments, which are
twice the parameters' size in fp32, are never read), each array laid out by the rules table and
floating parameters cast to `dtype` on load.  The expert biases stay float32: they decide the
top-k selection, which bf16 rounding would change.  This is the entry point that evaluation,
inference and post-training share, so the program computes as `runtime.program.inference_impl`
says (dropless expert dispatch whatever the run trained with, unless `impl` sets it).  The path
is an etils `epath` path (local, or an object store such as `gs://` where its backends are
installed).

The step is verified against its checksum manifest first (`integrity.py`; a step written before
manifests existed is restored with a warning).  A step that does not verify or restore raises
`CheckpointError`, one line naming the step, the file or the reason, and the other steps by
verdict (which one to load instead); nothing is moved or changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh
from omegaconf import OmegaConf

from frontier_jax.model import ModelConfig, Transformer
from frontier_jax.model.config import ImplConfig
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.mesh import build_mesh
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.integrity import (
    CORRUPT,
    UNVERIFIED,
    CheckpointError,
    first_line,
    raise_interruption,
    restorable_steps_hint,
    verify_step,
)
from frontier_jax.runtime.program import (
    ModelProgram,
    ModelSections,
    build_model_program,
    inference_impl,
    model_program,
)

log = logging.getLogger(__name__)


class RestoredModel(NamedTuple):
    config: dict  # the checkpoint's resolved run config, as saved (`Config.to_dict()`), with
    # "stage" (its context stage) and "tokenizer" (`data.tokenizer_identity`) records
    step: int
    params: dict  # pure dict, sharded on the program's mesh, in the requested dtype
    biases: dict  # expert-selection biases (float32)
    program: ModelProgram  # the model of `config` on the mesh the arrays live on (`program.cfg`:
    # its typed model / mesh / precision sections, mesh as restored onto)
    directory: epath.Path  # the orbax checkpoint directory holding step `step`

    def model(self) -> Transformer:
        return self.program.model(self.params, self.biases)

    def trained(self) -> str:
        """Who recorded this checkpoint's tokenizer, for `data.run_tokenizer`."""
        return f"checkpoint {self.step} in {self.directory} was trained"


def checkpoint_directory(path: epath.PathLike) -> tuple[epath.Path, int | None]:
    """(orbax checkpoint directory, step named by the path) for a run directory, its
    `checkpoints/` directory or one step directory `checkpoints/<step>`."""
    path = epath.Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", None
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        return path, None
    raise ValueError(
        f"no checkpoint in {path}: expected a run directory holding checkpoints/<step>/, "
        "its checkpoints/ directory or one checkpoints/<step>/ directory"
    )


def _section(cls, saved: dict, name: str):
    """The typed, validated config section `name` of a saved run config."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), saved.get(name, {}))).validate()


def _on_mesh(saved: dict, mesh: Mesh | MeshConfig | None, impl: Mapping | None) -> ModelProgram:
    """The model program of the saved config on `mesh` (a MeshConfig replaces the saved mesh
    section, rules included), computed as `inference_impl` says."""
    cfg = ModelSections(
        _section(ModelConfig, saved, "model"),
        _section(MeshConfig, saved, "mesh"),
        _section(PrecisionConfig, saved, "precision"),
        inference_impl(_section(ImplConfig, saved, "impl"), impl),
    )
    if isinstance(mesh, MeshConfig):
        return build_model_program(dataclasses.replace(cfg, mesh=mesh.validate()))
    if mesh is None:  # the first device alone
        mesh = build_mesh(MeshConfig(data=1), jax.devices()[:1])
    return build_model_program(cfg, mesh=mesh)


def saved_program(path: epath.PathLike, step: int | None = None) -> ModelProgram:
    """The abstract model program (shapes only, no mesh, nothing read but the config) of the
    checkpoint `step` (None: the latest) of the run at `path`."""
    _, saved = saved_config(path, step)
    sections = ModelSections(
        _section(ModelConfig, saved, "model"),
        _section(MeshConfig, saved, "mesh"),
        _section(PrecisionConfig, saved, "precision"),
        _section(ImplConfig, saved, "impl"),
    )
    return model_program(sections)


def _target(abstract: nnx.State, shardings: dict, dtype) -> dict:
    """ShapeDtypeStructs with target shardings and (floating leaves) dtype."""

    def leaf(var, sharding):
        cast = dtype is not None and jnp.issubdtype(var.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(var.shape, jnp.dtype(dtype) if cast else var.dtype, sharding=sharding)

    return jax.tree.map(leaf, nnx.to_pure_dict(abstract), shardings)


def _manager(directory: epath.Path) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path, path, step, step_in_path) -> int:
    """The step to read: `step`, else the one the path names, else the latest; ValueError naming
    the steps there are when it is not one of them."""
    if step is not None and step_in_path is not None and step != step_in_path:
        raise ValueError(f"step={step} contradicts the step directory {path}")
    step = step_in_path if step is None else step
    steps = sorted(manager.all_steps())
    if not steps:
        raise ValueError(f"no checkpoint in {directory}: it holds no checkpoints/<step>/ directory")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ValueError(
            f"no checkpoint of step {step} in {directory}; its steps: {', '.join(map(str, steps))}"
        )
    return step


def _read_config(manager: ocp.CheckpointManager, directory: epath.Path, step: int) -> dict:
    """The run config saved with verified step `step`."""
    try:
        return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as err:
        raise _does_not_restore(directory, step, err, "its config does not read") from err


def saved_config(path: epath.PathLike, step: int | None = None) -> tuple[int, dict]:
    """(step, the saved run config) of checkpoint `step` (None: the latest; or the step of a step
    directory) of the run at `path`, verified against its manifest, without reading any array."""
    directory, step_in_path = checkpoint_directory(path)
    with _manager(directory) as manager:
        step = _resolve_step(manager, directory, path, step, step_in_path)
        _verify(directory, step)
        return step, _read_config(manager, directory, step)


def restore_params(
    path: epath.PathLike,
    step: int | None = None,
    *,
    mesh: Mesh | MeshConfig | None = None,
    dtype=None,
    impl: Mapping | None = None,
) -> RestoredModel:
    """Parameters and expert biases of checkpoint `step` (None: the latest; or the step of a
    step directory) of the run at `path`.

    mesh: a `jax.sharding.Mesh`, a `MeshConfig` (built over all devices) or None (the first
    device); arrays are sharded on it by the rules table named by the checkpoint's `mesh.rules`
    (or the MeshConfig's).
    dtype: e.g. jnp.bfloat16 to cast the floating parameters on load (None: as saved, fp32).
    impl: impl.* choices given at load, over the saved ones (`inference_impl`)."""
    directory, step_in_path = checkpoint_directory(path)
    with _manager(directory) as manager:
        step = _resolve_step(manager, directory, path, step, step_in_path)
        _verify(directory, step)
        saved = _read_config(manager, directory, step)
        program = _on_mesh(saved, mesh, impl)
        param_shardings, bias_shardings = program.shardings()
        target = {
            "params": _target(program.abstract_params, param_shardings, dtype),
            "biases": _target(program.abstract_biases, bias_shardings, None),
        }
        try:
            state = manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item=target,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                        partial_restore=True,
                    )
                ),
            ).state
        except Exception as err:
            raise _does_not_restore(
                directory, step, err, "its state does not read as the model of its config"
            ) from err
    return RestoredModel(saved, step, state["params"], state["biases"], program, directory)


def _verify(directory: epath.Path, step: int) -> None:
    """Checks checkpoint `step` against its checksum manifest: `CheckpointError` when corrupt, a
    warning when it has none (written before checkpoints were checksummed)."""
    verdict = verify_step(directory, step)
    if verdict.status == CORRUPT:
        raise CheckpointError(
            f"checkpoint {step} in {directory} is corrupt: {verdict.detail}; "
            f"{restorable_steps_hint(directory, step)}"
        )
    if verdict.status == UNVERIFIED:
        log.warning("checkpoint %d in %s is unverified: %s", step, directory, verdict.detail)


def _does_not_restore(directory: epath.Path, step: int, err: Exception, what: str) -> CheckpointError:
    """The error of a step that orbax cannot read; only the first sentence of orbax's message (its
    advice, e.g. to restore with strict=False, does not apply to a damaged or mismatched step)."""
    raise_interruption(err)
    why = f"{what}: {first_line(err).split('. ')[0]}"
    return CheckpointError(
        f"checkpoint {step} in {directory} does not restore ({why}); {restorable_steps_hint(directory, step)}"
    )
