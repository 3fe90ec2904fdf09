"""The `model` reward: a trained reward model (`model.head: scalar`) scores prompt + completion.

    r_i = v(x_i) = g_{t_i} . w        x_i = conversation_ids(prompt_i, completion_i)  (`chat.py`)

with g the final-normed hidden state and t_i the last token of the rendering (`model.reward`).
The checkpoint's parameters are restored onto a mesh (`{name: model, checkpoint: RUN, mesh:
{data: -1}}`; all devices, data parallel, by default) and the samples are scored `batch_rows`
rows at a time, one sample per row, the rows padded to the longest rendering rounded up to a
multiple of 16 (segment id 1 on the sample's tokens, 0 on padding).  A rendering longer than the
model's `max_position_embeddings` is None (counted in the log).  A checkpoint with an LM head is a
configuration error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from omegaconf import OmegaConf

from frontier_jax.data.tokenizer import run_tokenizer
from frontier_jax.eval.scorer import batch_split
from frontier_jax.model.config import Head
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.mesh import batch_sharding
from frontier_jax.posttrain.chat import conversation_ids, run_template
from frontier_jax.runtime.restore import restore_params, saved_config

log = logging.getLogger(__name__)
_LENGTH_MULTIPLE = 16  # padded lengths: few distinct shapes, few compilations


def _mesh_config(mesh: Mesh | MeshConfig | Mapping | None) -> Mesh | MeshConfig:
    if mesh is None or isinstance(mesh, Mesh | MeshConfig):
        return mesh if mesh is not None else MeshConfig()
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(MeshConfig), dict(mesh))).validate()
    except Exception as e:
        raise ValueError(f"rewards model: bad mesh {dict(mesh)}: {str(e).splitlines()[0]}") from None


class ModelReward:
    def __init__(self, checkpoint: str, *, step: int | None = None, mesh=None, batch_rows: int = 8):
        step, saved = saved_config(checkpoint, step)
        head = saved.get("model", {}).get("head", Head.lm.value)
        if head != Head.scalar.value:
            raise ValueError(
                f"rewards model: checkpoint {checkpoint} (step {step}) has model.head={head}; the model "
                "reward needs a reward model (model.head=scalar, trained with a preference objective)"
            )
        restored = restore_params(checkpoint, step, mesh=_mesh_config(mesh))
        self.program, self.params, self.biases = restored.program, restored.params, restored.biases
        self.tokenizer = run_tokenizer(restored.config, restored.trained())
        self.template = run_template(restored.config)
        ways = batch_split(self.program)
        self.batch_rows = -(-max(batch_rows, 1) // ways) * ways
        self.max_len = self.program.cfg.model.max_position_embeddings
        self._in = batch_sharding(self.program.mesh, self.program.rules)
        self._values = self._value_step()

    def _value_step(self):
        program = self.program

        def values(params, biases, input_ids, segment_ids):
            with program.sharding_context():
                v, _ = program.model(params, biases).values(input_ids, None, segment_ids, segments=1)
            return v[:, 0]

        return jax.jit(values, out_shardings=NamedSharding(program.mesh, PartitionSpec()))

    def _assemble(self, host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, self._in, lambda index: host[index])

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        rendered = [
            conversation_ids(self.tokenizer, self.template, p, c) for p, c in zip(prompts, completions)
        ]
        fits = [i for i, ids in enumerate(rendered) if len(ids) <= self.max_len]
        if len(fits) < len(rendered):
            log.warning(
                "rewards model: %d samples longer than max_position_embeddings=%d: None",
                len(rendered) - len(fits),
                self.max_len,
            )
        scores: list[float | None] = [None] * len(rendered)
        for start in range(0, len(fits), self.batch_rows):
            rows = fits[start : start + self.batch_rows]
            longest = max(len(rendered[i]) for i in rows)
            length = min(-(-longest // _LENGTH_MULTIPLE) * _LENGTH_MULTIPLE, self.max_len)
            input_ids = np.zeros((self.batch_rows, length), np.int32)
            segment_ids = np.zeros((self.batch_rows, length), np.int32)
            for row, i in enumerate(rows):
                input_ids[row, : len(rendered[i])] = rendered[i]
                segment_ids[row, : len(rendered[i])] = 1
            values = self._values(
                self.params, self.biases, self._assemble(input_ids), self._assemble(segment_ids)
            )
            values = np.asarray(values.addressable_data(0))
            for row, i in enumerate(rows):
                scores[i] = float(values[row])
        return scores
