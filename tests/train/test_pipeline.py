"""Pipeline stages as the trainer's gradient strategy (`train.strategy.PipelineStages`): on 8 fake
CPU devices, the loss, metrics, expert loads and every gradient of the real Transformer (dense
prefix + MoE layers + MTP) run through the SPMD executor equal those of the unpipelined model
(`MicroBatchScan` on one device, local experts) on the same micro-batches, for every schedule,
on stage meshes with expert parallelism nested inside the stages and with data parallelism.

Tolerances (fp32; the pipeline sums the loss terms and the micro-batches in another order):
  loss, metrics           rtol 1e-5
  gradients               |g - g_ref| <= 1e-5 |g_ref| + 1e-6 max|g_ref| per leaf (elements far
                          below the leaf's scale carry the summation-order noise of the large ones)
  expert loads            exact (counts of real tokens)
  a2a_bytes               not compared: the reference dispatches locally; > 0 exactly where the
                          mesh has an expert axis
"""

from __future__ import annotations

import math
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.parallel.pipeline.schedule import ScheduleName
from frontier_jax.runtime.program import build_model_program
from frontier_jax.train.loop import train
from frontier_jax.train.objectives.pretrain import BATCH_KEYS
from frontier_jax.train.step import Trainer
from frontier_jax.train.strategy import MicroBatchScan, PipelineStages

from .common import REPO, cli_train_command, read_metrics, run_lock, subprocess_env, tiny_config
from .test_step import make_batch, make_state

ROWS = 32  # 4 x make_batch's 8 rows of very uneven lengths
# 1 dense + 8 MoE blocks: 8 MoE blocks split into 2, 4 or 8 chunks
BASE = (
    "model.num_layers=9",
    "data.mask_documents=true",
    "train.warmup_steps=0",
    f"train.global_batch={ROWS}",
)


def _cfg(*extra):
    return tiny_config(*BASE, *extra)


@pytest.fixture(scope="module")
def inputs():
    """(params, biases, batch): random weights and small random expert biases, 32 packed rows."""
    state = make_state(Trainer(_cfg()), seed=0)
    parts = [make_batch(seed) for seed in range(1, 5)]
    batch = {k: jnp.asarray(np.concatenate([p[k] for p in parts])) for k in BATCH_KEYS}
    return state.params, state.biases, batch


def _strategy_outputs(trainer: Trainer, params, biases, batch):
    """(loss, metrics, loads, grads) of the trainer's strategy on the prepared batch, as the
    train step computes them."""

    def fn(params, biases, batch):
        with trainer.program.sharding_context():
            prepared = trainer.objective.prepare(batch, {})
            norm = trainer.objective.normalisers(prepared, trainer.strategy.micro_batches)
            return trainer.strategy(params, biases, prepared, trainer.objective, norm)

    return jax.device_get(jax.jit(fn)(params, biases, batch))


@pytest.fixture(scope="module")
def reference(inputs, shared_dir):
    """reference(M): the unpipelined model's outputs with M micro-batches on one device."""
    done = {}

    def get(m: int):
        if m not in done:
            trainer = Trainer(_cfg(f"train.micro_batches={m}"))
            assert isinstance(trainer.strategy, MicroBatchScan)
            with run_lock(shared_dir, f"pipeline_reference_m{m}"):
                done[m] = _strategy_outputs(trainer, *inputs)
        return done[m]

    return get


def _pipelined(schedule: str, mesh: dict, m: int, inputs, *extra: str):
    cfg = _cfg(
        f"train.micro_batches={m}",
        f"train.pipeline.schedule={schedule}",
        *(f"mesh.{axis}={size}" for axis, size in mesh.items()),
        *extra,
    )
    program = build_model_program(cfg, jax.devices()[: math.prod(mesh.values())])
    trainer = Trainer(cfg, program=program)
    assert isinstance(trainer.strategy, PipelineStages)
    param_shardings, bias_shardings = program.shardings()
    params, biases, batch = inputs
    return _strategy_outputs(
        trainer, jax.device_put(params, param_shardings), jax.device_put(biases, bias_shardings), batch
    )


def assert_matches(got, want, expert_parallel: bool):
    (loss, metrics, loads, grads), (w_loss, w_metrics, w_loads, w_grads) = got, want
    np.testing.assert_allclose(loss, w_loss, rtol=1e-5)
    assert sorted(metrics) == sorted(w_metrics)
    for key in w_metrics:
        if key == "a2a_bytes":
            assert (metrics[key] > 0) == expert_parallel, metrics[key]
        else:
            np.testing.assert_allclose(metrics[key], w_metrics[key], rtol=1e-5, err_msg=key)
    assert jax.tree.structure(loads) == jax.tree.structure(w_loads)
    for a, b in zip(jax.tree.leaves(loads), jax.tree.leaves(w_loads)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree.structure(grads) == jax.tree.structure(w_grads)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(w_grads)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        bound = 1e-5 * np.abs(w) + 1e-6 * np.abs(w).max()
        assert np.all(np.abs(g - w) <= bound), (jax.tree_util.keystr(path), float(np.abs(g - w).max()))
        assert np.abs(w).max() > 0, jax.tree_util.keystr(path)  # every parameter gets a gradient


STAGE4_EXPERT2 = {"stage": 4, "data": 1, "expert": 2}
STAGE2_DATA2_EXPERT2 = {"stage": 2, "data": 2, "expert": 2}
STAGE8 = {"stage": 8, "data": 1}
STAGE4 = {"stage": 4, "data": 1}

# The default run's case (each compile of the real model through the executor costs ~30-60 s
# of one CPU core): every op (F, B, I, W, FB), the V placement (chunks gathered from the stage-
# sharded stack, both ends on rank 0), expert all-to-all nested inside each stage, data parallel
# rows.  The loop placement on 4 stages runs in the training-steps test below.
FAST = [("dualpipev", STAGE2_DATA2_EXPERT2, 4)]


def _slow_grid():
    """Every schedule on every mesh at its fewest micro-batches; on stage 4 x expert 2 also with
    2P and 4P micro-batches."""
    cases = []
    for name in ScheduleName:
        two_chunks = name in (ScheduleName.INTERLEAVED_1F1B, ScheduleName.DUALPIPEV)
        least = 2 if name == ScheduleName.DUALPIPEV else 1  # micro-batches per stage
        for mesh in (STAGE4 if two_chunks else STAGE8, STAGE4_EXPERT2, STAGE2_DATA2_EXPERT2):
            for k in (1, 2, 4) if mesh is STAGE4_EXPERT2 else (1,):
                case = (name.value, mesh, max(k, least) * mesh["stage"])
                if case not in FAST and case not in cases:
                    cases.append(case)
    return cases


@pytest.mark.parametrize("schedule,mesh,m", FAST, ids=lambda v: str(v))
def test_pipeline_strategy_equals_the_unpipelined_model(schedule, mesh, m, inputs, reference):
    assert_matches(
        _pipelined(schedule, mesh, m, inputs), reference(m), expert_parallel=mesh.get("expert", 1) > 1
    )


@pytest.mark.slow
@pytest.mark.parametrize("schedule,mesh,m", _slow_grid(), ids=lambda v: str(v))
def test_pipeline_strategy_grid(schedule, mesh, m, inputs, reference):
    assert_matches(
        _pipelined(schedule, mesh, m, inputs), reference(m), expert_parallel=mesh.get("expert", 1) > 1
    )


@pytest.mark.slow  # a minute of CI; the default run keeps the DualPipeV strategy case
def test_training_steps_on_stage4_data2_follow_the_single_device_losses(tmp_path):
    """`frontier-jax train` on one device (micro-batch accumulation) and `train()` on 8 devices
    with mesh.stage=4 mesh.data=2 (zero-bubble H1 over 4 stages, each micro-batch's 2 rows split
    over data) from the same seed and data: the same losses step by step (rtol 1e-5 at step 1;
    1e-4 after two AdamW updates, which turn gradient rounding into parameter differences)."""
    run = ("model.num_layers=5", "train.steps=3", "train.micro_batches=4", "checkpoint.every=0")
    single = subprocess.run(
        cli_train_command(tmp_path / "single", *run, "mesh.data=1"),
        env=subprocess_env(devices=1),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stdout + single.stderr
    cfg = tiny_config(*run, "mesh.stage=4", "mesh.data=2", "train.pipeline.schedule=zb-h1")
    piped = train(cfg, tmp_path / "piped", progress=False)
    want = read_metrics(tmp_path / "single")
    assert [r["step"] for r in piped] == [r["step"] for r in want] == [1, 2, 3]
    for got, ref in zip(piped, want):
        rtol = 1e-5 if got["step"] == 1 else 1e-4
        for key in ("loss", "ce_loss", "mtp_loss", "balance_loss", "z_loss", "grad_norm"):
            np.testing.assert_allclose(got[key], ref[key], rtol=rtol, err_msg=f"step {got['step']} {key}")
        assert got["tokens"] == ref["tokens"] and got["finite"] == 1
        assert got["moe_load_max_over_mean"] == pytest.approx(ref["moe_load_max_over_mean"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "impl",
    [("impl.remat=full",), ("impl.remat=save_dots",), ("impl.scan_layers=false", "impl.remat=full")],
    ids=",".join,
)
def test_pipeline_strategy_with_layer_remat(impl, inputs, reference):
    """impl.remat inside each chunk's recomputed forward (the layer scan's checkpoint under the
    executor's per-chunk VJP) changes nothing but what is kept; so does unrolling each chunk's
    layers (impl.scan_layers=false: the loop runs over the chunk's own L/C layer slices)."""
    got = _pipelined("zb-h1", STAGE4_EXPERT2, 4, inputs, *impl)
    assert_matches(got, reference(4), expert_parallel=True)
