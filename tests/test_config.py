"""Config files that cannot be read are one ValueError naming the file and what is wrong
(frontier_jax/config.py `load_config`); through the CLI that is one `error:` line and exit 2."""

from __future__ import annotations

import pytest

from frontier_jax import cli
from frontier_jax.config import load_config


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "model:\n  hidden_size: [32\n",
            r"YAML syntax error at line 3, column 1: did not find expected ',' or ']'",
        ),
        ("model:\n\thidden_size: 32\n", r"YAML syntax error at line 2, column 1"),
        ("- model\n- train\n", r"the top level is a list, not a mapping of sections"),
        ("include: model/toy.yaml\n", r"include='model/toy.yaml' must be a list of YAML paths"),
        ("include: [3]\n", r"include=\[3\] must be a list of YAML paths"),
        ("", r"is empty: give it sections \(model:, train:, \.\.\.\) or an include: list$"),
        ("# the sections come later\n", r"is empty: give it sections"),
    ],
)
def test_unreadable_config_file_is_named_with_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        load_config(str(path))
    assert str(path) in str(err.value)


def test_unreadable_config_file_through_the_cli_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("train: {steps: 3\n")
    assert cli.main(["describe", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: config file {path}: YAML syntax error") and err.count("\n") == 1


def test_an_empty_config_file_is_refused_not_described_as_the_default_model(tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert cli.main(["describe", "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (
        captured.err
        == f"error: config file {path} is empty: give it sections (model:, train:, ...) or an include: list\n"
    )


def test_an_empty_included_file_names_the_file_that_includes_it(tmp_path):
    (tmp_path / "empty.yaml").write_text("\n")
    (tmp_path / "run.yaml").write_text("include: [empty.yaml]\ntrain: {seed: 2}\n")
    with pytest.raises(
        ValueError,
        match=rf"^config file {tmp_path / 'empty.yaml'} is empty: .* \(it is included by {tmp_path / 'run.yaml'}\)$",
    ):
        load_config(str(tmp_path / "run.yaml"))


def test_a_missing_include_names_the_file_that_includes_it(tmp_path):
    (tmp_path / "run.yaml").write_text("include: [../model/tiny.yaml]\ntrain: {seed: 2}\n")
    with pytest.raises(FileNotFoundError) as err:
        load_config(str(tmp_path / "run.yaml"))
    assert str(err.value) == (
        f"config file {tmp_path / 'run.yaml'} includes {tmp_path.parent / 'model' / 'tiny.yaml'}, which does not "
        "exist: fix its include: list"
    )


def test_included_files_still_merge_in_order(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {steps: 7, seed: 1}\n")
    (tmp_path / "run.yaml").write_text("include: [base.yaml]\ntrain: {seed: 2}\n")
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert (cfg.train.steps, cfg.train.seed) == (7, 2)


def test_an_override_into_a_list_is_a_value_error_not_a_type_error():
    with pytest.raises(
        ValueError, match=r"data\.sources\.0\.weight=0\.5: .*a list \(e\.g\. data\.sources\) is replaced"
    ):
        load_config("model/toy", ["data.sources.0.weight=0.5"])


def test_cudnn_attention_with_an_fp32_policy_is_refused_naming_both_fields():
    # cuDNN's fused attention takes 16-bit queries: on a GPU an fp32 policy failed inside the
    # compiled step with a NotImplementedError
    with pytest.raises(ValueError, match=r"impl.attention=cudnn.*precision.policy='fp32'.*bf16"):
        load_config("train/toy", ["impl.attention=cudnn"])
    assert (
        load_config("train/toy", ["impl.attention=cudnn", "precision.policy=bf16"]).impl.attention == "cudnn"
    )
