"""`train.init_from`: a new run that starts from another run's parameters.

    train.init_from: RUN_DIR                    the latest checkpoint of a training run
                     RUN_DIR/checkpoints/STEP   one checkpoint of it
                     hf:PATH                    a Hugging Face DeepseekV3 directory (`convert.from_hf`)

Only the parameters and expert biases are taken, onto the new run's mesh and layout: the run
starts at step 0 with a fresh optimizer state and the new config's data and schedule.  The
source's `model:` section must equal the new config's in every field but `head` and `mtp_depth`
(and the `name` label), so that an LM run can start a reward model (`model.head=scalar`) or a
model with another MTP depth:  parameters present in both (by path; expert biases included) are
copied, the new model's others are initialised from `train.seed`, and the source's parameters
the new model lacks are dropped (each kind listed in one log line).  A run directory that has
checkpoints of its own resumes from them: the source seeds the first start only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import NamedTuple

import jax
from flax import nnx
from omegaconf import OmegaConf

from frontier_jax.convert import from_hf, hf_config_to_model_config
from frontier_jax.convert.safetensors_io import read_json
from frontier_jax.model import ModelConfig
from frontier_jax.model.routing import ExpertBias
from frontier_jax.runtime.program import ModelProgram
from frontier_jax.runtime.restore import restore_params, saved_config

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
MAY_DIFFER = ("name", "head", "mtp_depth")  # model fields a source may differ in


class InitSource(NamedTuple):
    spec: str  # train.init_from as given
    step: int | None  # the checkpoint's step (None for a Hugging Face directory)

    @property
    def hf_path(self) -> str | None:
        return self.spec[len(HF_PREFIX) :] if self.spec.startswith(HF_PREFIX) else None


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + (key,)))
        else:
            out[prefix + (key,)] = value
    return out


def _unflat(flat: dict[tuple, object]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _name(path: tuple) -> str:
    return ".".join(map(str, path))


def read_source(spec: str, model: ModelConfig) -> InitSource:
    """The source named by `train.init_from` (its config only, no array read), checked against
    the new run's `model` section; ValueError (one line) naming the fields that differ."""
    if spec.startswith(HF_PREFIX):
        path, step = spec[len(HF_PREFIX) :], None
        source = hf_config_to_model_config(read_json(os.path.join(path, "config.json"), "the model config"))
    else:
        step, saved = saved_config(spec)
        source = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ModelConfig), saved.get("model", {}))
        )
    theirs, ours = (_flat(dataclasses.asdict(m)) for m in (source, model))
    diffs = [
        f"model.{_name(k)} (source {theirs.get(k)!r}, config {ours.get(k)!r})"
        for k in sorted(set(theirs) | set(ours))
        if k[0] not in MAY_DIFFER and theirs.get(k) != ours.get(k)
    ]
    if diffs:
        raise ValueError(
            f"train.init_from={spec}: its model differs from this config's in {', '.join(diffs)}; "
            f"only model.head and model.mtp_depth may differ: use the source's model section"
        )
    return InitSource(spec, step)


def _source_arrays(source: InitSource, program: ModelProgram) -> tuple[dict, dict]:
    """(params, biases) of the source as pure dicts on the program's mesh, in float32."""
    if source.hf_path is None:
        restored = restore_params(source.spec, mesh=program.mesh)
        return restored.params, restored.biases
    _, model = from_hf(source.hf_path, mesh=program.mesh, rules=program.rules, impl=program.cfg.impl)
    _, params, biases = nnx.split(model, nnx.Param, ExpertBias)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(biases)


def _merge(fresh: dict, source: dict, shardings: dict) -> tuple[dict, list[str], list[str]]:
    """(fresh with every leaf the source has at the same path replaced by the source's, placed
    with `shardings`; the paths initialised fresh; the source's paths dropped)."""
    fresh_flat, source_flat, layout = _flat(fresh), _flat(source), _flat(shardings)
    merged, new = {}, []
    for path, value in fresh_flat.items():
        if path not in source_flat:
            merged[path] = value
            new.append(_name(path))
            continue
        theirs = source_flat[path]
        if theirs.shape != value.shape:
            raise ValueError(
                f"train.init_from: parameter {_name(path)} has shape {tuple(theirs.shape)} in the source "
                f"and {tuple(value.shape)} here"
            )
        merged[path] = jax.device_put(theirs.astype(value.dtype), layout[path])
    dropped = [_name(p) for p in source_flat if p not in fresh_flat]
    return _unflat(merged), new, dropped


def initial_parameters(source: InitSource, program: ModelProgram, seed: int) -> tuple[dict, dict]:
    """(params, biases) of step 0: the source's where this model has them, the rest initialised
    from `seed`, laid out by the program's shardings; logs what was initialised and dropped."""
    param_shardings, bias_shardings = program.shardings()
    fresh_params, fresh_biases = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())(
        seed
    )
    theirs_params, theirs_biases = _source_arrays(source, program)
    params, new_p, dropped_p = _merge(fresh_params, theirs_params, param_shardings)
    biases, new_b, dropped_b = _merge(fresh_biases, theirs_biases, bias_shardings)
    where = source.spec if source.step is None else f"{source.spec} (step {source.step})"
    log.info(
        "init_from %s: parameters copied; initialised from train.seed=%d: %s",
        where,
        seed,
        new_p + new_b or "none",
    )
    log.info("init_from %s: source parameters dropped: %s", where, dropped_p + dropped_b or "none")
    return params, biases
