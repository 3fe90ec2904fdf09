"""Bad configurations fail early, with the offending field named (frontier_jax/config.py,
frontier_jax/train/loop.py, frontier_jax/cli.py)."""

from __future__ import annotations

import pytest

from frontier_jax import cli
from frontier_jax.config import load_config
from frontier_jax.train.loop import train

from .common import tiny_config, tiny_overrides


def test_global_batch_not_divisible_by_data_parallel_devices(tmp_path, no_compile):
    with pytest.raises(ValueError, match=r"train\.global_batch=12 .*8-way batch split"):
        train(tiny_config("train.global_batch=12"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_global_batch_error_through_the_cli(tmp_path, capsys, no_compile):
    argv = [
        "train",
        "--config",
        "model/toy",
        "--run-dir",
        str(tmp_path / "run"),
        *tiny_overrides("train.global_batch=12"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train.global_batch=12" in err


def test_mesh_that_does_not_match_the_device_count(tmp_path, no_compile):
    with pytest.raises(ValueError, match=r"mesh: axis sizes .* 8 devices"):
        train(tiny_config("mesh.data=3"), tmp_path / "run", progress=False)


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.stepz=5", "train.stepz"),
        ("trian.steps=5", "trian"),
        ("model.hidden=64", "model.hidden"),
    ],
)
def test_unknown_override_key_is_named(override, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")) as err:
        load_config("model/toy", [override])
    assert "invalid config" in str(err.value)


def test_unknown_key_through_the_cli(tmp_path, capsys, no_compile):
    assert (
        cli.main(["train", "--config", "model/toy", "--run-dir", str(tmp_path / "run"), "train.stepz=5"]) == 2
    )
    err = capsys.readouterr().err
    assert "train.stepz" in err
    assert not (tmp_path / "run").exists()  # rejected before anything was written


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", r"train\.steps"),
        ("train.schedule=linear", r"train\.schedule='linear'.*constant, cosine, deepseek"),
        ("train.micro_batches=3", r"train\.global_batch=16 is not divisible by train\.micro_batches=3"),
        ("train.moment_dtype=float16", r"train\.moment_dtype"),
        ("train.on_nonfinite=ignore", r"train\.on_nonfinite"),
        ("train.lr_min=1.0", r"train\.lr_min"),
        ("checkpoint.keep=0", r"checkpoint\.keep"),
        ("mesh.fsdp=0", r"mesh\.fsdp"),
        ("train.steps", r"not of the form key=value"),
    ],
)
def test_invalid_values_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("model/toy", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.stages=[{start_step: 5, weights: {web: 1}}]",
            "error: data.stages[0].weights names source 'web', which is not in data.sources "
            "(sources: ['code', 'math']): fix the name or add the source.",
        ),
        (
            "data.stages=[{start_step: 5, weights: {code: 1}}, {start_step: 5, weights: {math: 1}}]",
            "error: data.stages[1].start_step=5 is not after data.stages[0].start_step=5: list the "
            "stages by strictly increasing start_step.",
        ),
        (
            "data.stages=[{start_step: 5, weights: {code: 0, math: 0}}]",
            "error: data.stages[0].weights={'code': 0.0, 'math': 0.0} do not sum to a positive total: "
            "give at least one source a weight > 0.",
        ),
    ],
    ids=["unknown_source", "not_increasing", "zero_total"],
)
def test_a_bad_mixture_schedule_is_one_line_through_the_cli_before_anything_is_written(
    tmp_path, capsys, override, message
):
    run = tmp_path / "run"
    assert cli.main(["train", "--config", "train/toy", "--run-dir", str(run), override]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not run.exists()
