"""Context stages (frontier_jax/train/phases.py, loop.py): the schedule, its checks, the V3 preset,
and a two-stage run that resumes exactly at and after the stage boundary."""

from __future__ import annotations

import math
import shutil

import jax
import numpy as np
import pytest
import yaml

from frontier_jax import cli
from frontier_jax.config import CONFIG_DIR, load_config
from frontier_jax.model.rope import rope_frequencies, softmax_scale
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.parallel.mesh import build_mesh, check_seq_fits
from frontier_jax.parallel.rules import DEFAULT_RULES
from frontier_jax.runtime.program import model_program
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train
from frontier_jax.train.optimizer import learning_rate_schedule
from frontier_jax.train.phases import checkpoint_phase, context_phases, phase_at

from .common import (
    REPO,
    assert_trees_equal,
    computed_metrics,
    read_metrics,
    restore_checkpoint,
    tiny_overrides,
)

TOY = str(CONFIG_DIR / "model" / "toy.yaml")
YARN_2X = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}
# The two-stage run: 2 steps of 16 rows x 32 tokens, then 2 steps of 8 rows x 64 tokens under
# YaRN (factor 2 from 32) at a constant lr.
TWO_STAGES = [
    {"until_step": 2, "seq_len": 32, "global_batch": 16},
    {"until_step": 4, "seq_len": 64, "global_batch": 8, "lr": 1e-3, "rope_scaling": YARN_2X},
]


def staged_config(tmp_path, stages, *overrides, includes=(TOY,)):
    """The tiny run (common.tiny_overrides) with `train.stages` = `stages` (a list is given in a
    YAML file: dotted overrides cannot build one)."""
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump({"include": list(includes), "train": {"stages": stages}}))
    return load_config(str(path), tiny_overrides(*overrides))


# ------------------------------------------------------------------ bad input, before compiling
@pytest.mark.parametrize(
    "stages, overrides, message",
    [
        (
            [
                {"until_step": 4, "seq_len": 32, "global_batch": 8},
                {"until_step": 4, "seq_len": 64, "global_batch": 8},
            ],
            ("train.steps=4",),
            r"train\.stages\[1\]\.until_step=4 must exceed train\.stages\[0\]\.until_step=4",
        ),
        (
            [{"until_step": 0, "seq_len": 32, "global_batch": 8}],
            (),
            r"train\.stages\[0\]\.until_step=0 must exceed 0",
        ),
        (
            [{"until_step": 3, "seq_len": 32, "global_batch": 8}],
            ("train.steps=5",),
            r"train\.steps=5 runs past the last stage \(train\.stages\[0\]\.until_step=3\)",
        ),
        (
            [{"until_step": 3, "seq_len": 1, "global_batch": 8}],
            ("train.steps=3",),
            r"train\.stages\[0\]\.seq_len=1 must be >= 2",
        ),
        (
            [{"until_step": 3, "seq_len": 32, "global_batch": 6}],
            ("train.steps=3", "train.micro_batches=4"),
            r"train\.stages\[0\]\.global_batch=6 must be a positive multiple of train\.micro_batches=4",
        ),
        (
            [{"until_step": 3, "seq_len": 32, "global_batch": 8, "lr": 0.0}],
            ("train.steps=3",),
            r"train\.stages\[0\]\.lr=0\.0 must be > 0",
        ),
        (
            [{"until_step": 3, "seq_len": 32, "global_batch": 8, "rope_scaling": {**YARN_2X, "factor": 0.5}}],
            ("train.steps=3",),
            r"train\.stages\[0\]\.rope_scaling\.factor=0\.5 is invalid: YaRN needs factor >= 1",
        ),
    ],
)
def test_stage_fields_are_checked_on_load(tmp_path, stages, overrides, message):
    with pytest.raises(ValueError, match=message):
        staged_config(tmp_path, stages, *overrides)


@pytest.mark.parametrize(
    "second, message",
    [
        (  # the model's context
            {"until_step": 4, "seq_len": 8192, "global_batch": 8},
            r"train\.stages\[1\]\.seq_len=8192 exceeds the model's context, model\.max_position_embeddings=4096: "
            r"lower the seq_len or raise model\.max_position_embeddings",
        ),
        (  # the context YaRN is scaled for
            {"until_step": 4, "seq_len": 100, "global_batch": 8, "rope_scaling": YARN_2X},
            r"train\.stages\[1\]\.seq_len=100 exceeds the context its YaRN scaling is made for, "
            r"train\.stages\[1\]\.rope_scaling\.factor=2\.0 x original_max_position_embeddings=32 = 64: "
            r"raise train\.stages\[1\]\.rope_scaling\.factor to >= 3\.13",
        ),
        (  # the 8-way batch split of the 8 test devices
            {"until_step": 4, "seq_len": 64, "global_batch": 12},
            r"train\.stages\[1\]\.global_batch=12 is not divisible by the 8-way batch split",
        ),
    ],
)
def test_what_a_stage_cannot_run_is_refused_before_compiling(tmp_path, no_compile, second, message):
    cfg = staged_config(tmp_path, [TWO_STAGES[0], second], "train.steps=4")

    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_sequence_split_must_divide_the_seq_len():
    """No shipped rules table splits `seq`; one that does needs seq_len divisible by it."""
    mesh = build_mesh(MeshConfig(data=2, fsdp=4))
    check_seq_fits(36, mesh, DEFAULT_RULES, field="train.stages[2].seq_len")  # `seq` unsplit: fine
    with pytest.raises(
        ValueError, match=r"train\.stages\[2\]\.seq_len=36 is not divisible by the 8-way seq split"
    ):
        check_seq_fits(36, mesh, {**DEFAULT_RULES, "seq": ("data", "fsdp")}, field="train.stages[2].seq_len")


def test_stage_error_through_the_cli(tmp_path, capsys, no_compile):
    path = tmp_path / "stages.yaml"
    bad = [
        {"until_step": 5, "seq_len": 32, "global_batch": 8},
        {"until_step": 3, "seq_len": 64, "global_batch": 8},
    ]
    path.write_text(yaml.safe_dump({"include": [TOY], "train": {"stages": bad}}))
    argv = [
        "train",
        "--config",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        *tiny_overrides("train.steps=3"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.stages[1].until_step=3 must exceed" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ the schedule
def test_stages_resolve_to_run_configs_with_their_rows_and_rope(tmp_path):
    cfg = staged_config(tmp_path, TWO_STAGES, "train.steps=4")
    first, second = context_phases(cfg)
    assert (first.start_step, first.until_step, second.start_step, second.until_step) == (0, 2, 2, 4)
    assert (first.cfg.train.seq_len, first.cfg.train.global_batch) == (32, 16)
    assert (second.cfg.train.seq_len, second.cfg.train.global_batch) == (64, 8)
    assert first.cfg.model.rope_scaling == cfg.model.rope_scaling  # none given: the model's
    assert second.cfg.model.rope_scaling.factor == 2.0
    assert [phase_at([first, second], k).index for k in range(6)] == [0, 0, 1, 1, 1, 1]
    assert [checkpoint_phase([first, second], k).index for k in range(5)] == [0, 0, 0, 1, 1]

    # the stages' models: the same parameters, other RoPE frequencies and softmax scale
    programs = [model_program(stage.cfg) for stage in (first, second)]
    shapes = [jax.tree.map(lambda v: (v.shape, v.dtype), p.abstract_params) for p in programs]
    assert shapes[0] == shapes[1]
    assert programs[0].graphdef != programs[1].graphdef
    assert not np.allclose(rope_frequencies(first.cfg.model), rope_frequencies(second.cfg.model))

    # lr: the base schedule ("deepseek" of the tiny run) in stage 0, the stage's constant in stage 1
    lr, base = learning_rate_schedule(cfg.train), learning_rate_schedule(staged_config(tmp_path, []).train)
    assert [float(lr(k)) for k in (0, 1)] == [float(base(k)) for k in (0, 1)]
    np.testing.assert_allclose([float(lr(k)) for k in (2, 3)], [1e-3, 1e-3], rtol=1e-6)


def test_deepseek_v3_preset(tmp_path):
    """configs/stages/deepseek-v3.yaml: 4K (the last 167B tokens at 7.3e-6), 32K x 1920, 128K x
    480 at 7.3e-6 with YaRN s = 40, beta 32 / 1, sqrt(t) = 0.1 ln s + 1 (V3 report Sec. 4.3)."""
    path = tmp_path / "v3.yaml"
    includes = [
        str(CONFIG_DIR / "model" / "deepseek-v3-671b.yaml"),
        str(CONFIG_DIR / "stages" / "deepseek-v3.yaml"),
    ]
    path.write_text(yaml.safe_dump({"include": includes}))
    cfg = load_config(str(path))
    stages = context_phases(cfg)  # fits the model's context and YaRN's
    rows = [(s.cfg.train.seq_len, s.cfg.train.global_batch, s.until_step - s.start_step) for s in stages]
    assert rows == [(4096, 15360, 237556), (4096, 15360, 2654), (32768, 1920, 1000), (131072, 480, 1000)]
    assert [s.cfg.model.rope_scaling.type for s in stages] == ["none", "none", "yarn", "yarn"]
    yarn = stages[3].cfg.model.rope_scaling
    assert (yarn.factor, yarn.original_max_position_embeddings, yarn.beta_fast, yarn.beta_slow) == (
        40,
        4096,
        32,
        1,
    )
    sqrt_t = 0.1 * math.log(40) + 1
    assert softmax_scale(stages[3].cfg.model) / softmax_scale(stages[0].cfg.model) == pytest.approx(sqrt_t**2)
    lr = learning_rate_schedule(cfg.train)
    for step, want in [
        (1000, 1.1e-4),
        (100_000, 2.2e-4),
        (236_000, 2.2e-5),
        (239_000, 7.3e-6),
        (242_000, 7.3e-6),
    ]:
        assert float(lr(step)) == pytest.approx(want, rel=1e-3), step


def test_readme_context_stage_example_is_the_run_behind_its_table():
    """The README's example is configs/train/toy-long-context.yaml as written (the config
    benchmarks/long_context.py trains): it loads, and its lr runs on across the boundary (the
    cosine reaches lr_min there, the extension stage's constant lr; a cosine over all 360 steps
    would jump from 5.09e-4 to 3.0e-4)."""
    readme = (REPO / "README.md").read_text()
    example = readme.split("### Context stages")[1].split("```yaml\n")[1].split("```")[0]
    path = CONFIG_DIR / "train" / "toy-long-context.yaml"
    assert yaml.safe_load(example) == yaml.safe_load(path.read_text())
    cfg = load_config("train/toy-long-context")
    lr = learning_rate_schedule(cfg.train)
    boundary = cfg.train.stages[0].until_step
    assert float(lr(boundary - 1)) == pytest.approx(cfg.train.stages[1].lr, rel=1e-3)
    assert float(lr(boundary)) == pytest.approx(cfg.train.stages[1].lr) == cfg.train.lr_min


# ------------------------------------------------------------------ a two-stage run, resumed
@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory):
    """run_dir of an uninterrupted 4-step run of TWO_STAGES, a checkpoint after every step."""

    tmp = tmp_path_factory.mktemp("two_stages")
    cfg = staged_config(tmp, TWO_STAGES, "train.steps=4", "checkpoint.every=1", "checkpoint.keep=10")
    history = train(cfg, tmp / "run", progress=False)
    assert [(r["step"], r["stage"], r["seq_len"], r["batch_rows"]) for r in history] == [
        (1, 0, 32, 16),
        (2, 0, 32, 16),
        (3, 1, 64, 8),
        (4, 1, 64, 8),
    ]
    return tmp, cfg


def test_checkpoints_record_their_stage_and_its_rope(two_stage_run):
    tmp, _ = two_stage_run
    at_boundary, in_second = restore_params(tmp / "run", 2), restore_params(tmp / "run", 3)
    assert at_boundary.config["stage"] == {"index": 0, "start_step": 0, "until_step": 2}
    assert in_second.config["stage"] == {"index": 1, "start_step": 2, "until_step": 4}
    assert at_boundary.config["train"]["seq_len"] == 32 and in_second.config["train"]["seq_len"] == 64
    # a parameters-only restore builds the model with the RoPE its parameters were trained with
    assert at_boundary.program.cfg.model.rope_scaling.type == "none"
    assert (
        in_second.program.cfg.model.rope_scaling == context_phases(two_stage_run[1])[1].cfg.model.rope_scaling
    )


@pytest.mark.parametrize("resume_at", [2, 3], ids=["at-the-boundary", "within-the-second-stage"])
def test_resume_is_exact_across_and_within_a_stage(two_stage_run, tmp_path, resume_at):
    """From the checkpoint after step `resume_at` alone, a fresh train() reaches step 4 with the
    uninterrupted run's metrics (same batches: same tokens, same loss), state and data position."""

    tmp, cfg = two_stage_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run" / "checkpoints" / str(resume_at), run / "checkpoints" / str(resume_at))
    history = train(cfg, run, progress=False)
    want = {r["step"]: computed_metrics(r) for r in read_metrics(tmp / "run")}
    assert [r["step"] for r in history] == list(range(resume_at + 1, 5))
    for record in history:
        assert computed_metrics(record) == want[record["step"]], record["step"]

    state, data_state = restore_checkpoint(run, 4, context_phases(cfg)[1].cfg)
    ref_state, ref_data_state = restore_checkpoint(tmp / "run", 4, context_phases(cfg)[1].cfg)
    assert_trees_equal(state, ref_state, "state")
    assert data_state == ref_data_state
