"""What plugs into the trainer (frontier_jax/train/loop.py, init_from.py, batches.py): another
objective and batch source without editing the loop, `train.init_from` (an LM run's parameters
start a reward model), the objective's own state in `TrainState.extra`, and a scalar-head
checkpoint restored onto another mesh.

The objective is a small reward-model regression: each row's value v (the scalar head at the
row's last token) is fit to a target r, with a pull towards the values of the run's initial
parameters, which it keeps in `extra`:
    loss = sum_rows [(v - r)^2 + beta (v - v_0)^2] / rows.
Its batches hold no segment ids, no loss mask and report no token count (the loop and the step
used to require all three)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from frontier_jax.runtime.program import build_model_program
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.batches import BatchSource
from frontier_jax.train.init_from import initial_parameters, read_source
from frontier_jax.train.loop import train
from frontier_jax.train.step import Trainer
from tests.model import reference as ref

from .common import read_metrics, tiny_config

ROWS, SEQ, BETA = 8, 16, 0.5


class ValueRegression:
    batch_spec = {"input_ids": np.dtype(np.int32), "rewards": np.dtype(np.float32)}

    def __init__(self, program):
        self.program = program  # reads the initial parameters' values

    def init_extra(self, params, biases):
        return {"params": params, "biases": biases}

    def extra_shardings(self, param_shardings, bias_shardings):
        return {"params": param_shardings, "biases": bias_shardings}

    def _values(self, model, input_ids):
        out = model.hidden(input_ids, with_mtp=False)
        values, _ = model.output_head().segment_values(out.hidden, None, 1)
        return values[:, 0], out

    def prepare(self, batch, extra):
        initial = self.program.model(extra["params"], extra["biases"])
        return {**batch, "initial": jax.lax.stop_gradient(self._values(initial, batch["input_ids"])[0])}

    def normalisers(self, batch, micro_batches):
        return {"rows": jnp.float32(batch["input_ids"].shape[0])}

    def __call__(self, model, mb, norm):
        v, out = self._values(model, mb["input_ids"])
        se = jnp.sum((v - mb["rewards"]) ** 2)
        loss = (se + BETA * jnp.sum((v - mb["initial"]) ** 2)) / norm["rows"]
        return loss, {"se": se}, model.expert_loads(out)

    def summarize(self, metrics, norm):
        return {"value_mse": metrics["se"] / norm["rows"]}


class RandomRows(BatchSource):
    """Batch k: token rows drawn from seed k, reward = the share of even tokens in the row.
    Records the step of the state each batch is made for and of each update it hears of."""

    def __init__(self, vocab: int):
        self.vocab, self.k, self.made_for, self.updated = vocab, 0, [], []

    def next(self, state):
        self.made_for.append(int(state.step))
        ids = np.random.default_rng(self.k).integers(0, self.vocab, (ROWS, SEQ)).astype(np.int32)
        self.k += 1
        return {"input_ids": ids, "rewards": (ids % 2 == 0).mean(1).astype(np.float32)}

    def get_state(self):
        return {"k": self.k}

    def set_state(self, state):
        self.k = state["k"]

    def after_update(self, state):
        self.updated.append(int(state.step))


def _cfg(source, *extra):
    return tiny_config(
        "model.head=scalar",
        "model.mtp_depth=0",
        f"train.init_from={source}",
        f"train.global_batch={ROWS}",
        f"train.seq_len={SEQ}",
        "train.warmup_steps=0",
        *extra,
    )


def _flat(tree, prefix=()):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, prefix + (key,)).items()}
    return {prefix: np.asarray(jax.device_get(tree))}


@pytest.fixture(scope="module")
def source(reference_run):
    """The LM run that starts the reward model: its latest parameters (MTP depth 1, LM head)."""
    return str(reference_run), restore_params(reference_run)


def test_init_from_an_lm_run_starts_a_reward_model_at_step_0(source):
    run, lm = source
    cfg = _cfg(run)
    program = build_model_program(cfg)
    trainer = Trainer(cfg, program=program, objective=ValueRegression(program))
    params, biases = initial_parameters(read_source(cfg.train.init_from, cfg.model), program, cfg.train.seed)
    state = trainer.start(params, biases, cfg.train.seed)  # what Runner.start jits

    assert int(state.step) == 0
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert moments and not any(np.asarray(m).any() for m in moments)  # fresh AdamW mu, nu
    ours, theirs = _flat({"p": state.params, "b": state.biases}), _flat({"p": lm.params, "b": lm.biases})
    shared = set(ours) & set(theirs)
    assert set(ours) - shared == {("p", "score", "kernel")}  # the scalar head: new
    assert {p[1] for p in set(theirs) - shared} == {"head", "mtp"}  # the LM head and MTP: dropped
    for path in shared:
        np.testing.assert_array_equal(ours[path], theirs[path], err_msg=str(path))
    init = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())
    fresh = _flat(jax.device_get(init(cfg.train.seed)[0]))
    np.testing.assert_array_equal(ours[("p", "score", "kernel")], fresh[("score", "kernel")])
    for path, value in _flat({"p": state.extra["params"], "b": state.extra["biases"]}).items():
        np.testing.assert_array_equal(value, ours[path], err_msg=f"extra {path}")


def test_a_model_section_that_differs_beyond_head_and_mtp_is_one_error_line(source):
    run, _ = source
    with pytest.raises(ValueError) as err:
        read_source(run, _cfg(run, "model.hidden_size=48", "model.num_heads=4").model)
    message = str(err.value)
    assert "\n" not in message
    assert (
        "model.hidden_size (source 32, config 48)" in message
        and "model.num_heads (source 2, config 4)" in message
    )
    assert "only model.head and model.mtp_depth may differ" in message


def test_a_custom_objective_and_batch_source_train_checkpoint_and_resume(source, tmp_path):
    """1 step on 8 devices from the LM run, then a resume to step 2: the resumed run continues
    its own checkpoint (not the source), its batch source where it stopped and its extra as
    saved; the checkpoint's scalar head restores on one device and reads, at each row's last
    token, the values of the float64 reference model."""
    run, lm = source
    cfg, run_dir = _cfg(run, "train.steps=1"), tmp_path / "reward"
    batches = RandomRows(cfg.model.vocab_size)
    history = train(
        cfg, run_dir, objective=ValueRegression(build_model_program(cfg)), batches=batches, progress=False
    )
    assert [r["step"] for r in history] == [1]
    assert "value_mse" in history[0] and "tokens_per_s" not in history[0]
    assert batches.made_for == [0] and batches.updated == [1]

    again = RandomRows(cfg.model.vocab_size)
    cfg2 = _cfg(run, "train.steps=2")
    resumed = train(
        cfg2, run_dir, objective=ValueRegression(build_model_program(cfg2)), batches=again, progress=False
    )
    assert [r["step"] for r in resumed] == [2] and again.made_for == [1] and again.k == 2
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]

    restored = restore_params(run_dir)  # onto the first device
    assert restored.step == 2 and restored.program.mesh.size == 1
    ids = np.random.default_rng(9).integers(0, cfg.model.vocab_size, (2, SEQ)).astype(np.int32)
    values, present = jax.jit(lambda p, b, i: restored.program.model(p, b).values(i))(
        restored.params, restored.biases, ids
    )
    f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), _merge(restored.params, restored.biases))
    segments = np.ones_like(ids)
    want, _ = ref.segment_values(f64, ids, cfg.model, np.tile(np.arange(SEQ), (2, 1)), segments, 1)
    assert np.asarray(present).all()
    np.testing.assert_allclose(values, want, rtol=1e-4, atol=5e-5)  # fp32 vs float64, as the logits

    manager = ocp.CheckpointManager(
        (run_dir / "checkpoints").resolve(), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    extra = manager.restore(2, args=ocp.args.Composite(extra=ocp.args.StandardRestore())).extra
    initial, saved = (
        _flat({"p": lm.params, "b": lm.biases}),
        _flat({"p": extra["params"], "b": extra["biases"]}),
    )
    assert len(saved) == len(_flat(restored.params)) + len(_flat(restored.biases))
    for path in set(saved) & set(initial):  # the initial parameters, as the source had them
        np.testing.assert_array_equal(saved[path], initial[path], err_msg=str(path))


def _merge(params: dict, biases: dict) -> dict:
    """One tree of parameters and expert biases, as the reference model reads it."""
    out = dict(params)
    for key, value in biases.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


@pytest.mark.slow  # ~20 s: a transformers model saved and imported twice; the merge is the run directory's
def test_init_from_a_hugging_face_directory_copies_its_weights(tmp_path):
    """hf:PATH: the streamed import's parameters, the LM head dropped for a scalar head."""
    from frontier_jax.convert import from_hf
    from frontier_jax.convert.hf_config import hf_config_to_model_config
    from frontier_jax.parallel.config import MeshConfig
    from frontier_jax.precision.config import PrecisionConfig
    from frontier_jax.runtime.program import ModelSections
    from tests.convert.helpers import read_config, tiny_hf_model

    tiny_hf_model().save_pretrained(tmp_path)
    model = hf_config_to_model_config(read_config(str(tmp_path))).replace(head="scalar", mtp_depth=0)
    program = build_model_program(
        ModelSections(model, MeshConfig(data=1), PrecisionConfig()), jax.devices()[:1]
    )
    params, biases = initial_parameters(read_source(f"hf:{tmp_path}", model), program, seed=0)
    _, imported = from_hf(str(tmp_path))
    want = _flat(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(imported))))
    got = _flat(_merge(params, biases))
    assert set(want) - set(got) == {("head", "kernel")} and set(got) - set(want) == {("score", "kernel")}
    for path in set(got) & set(want):
        np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
