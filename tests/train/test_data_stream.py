"""The resume check of the data stream (train/checkpoint.py `check_same_data_stream`) with
checkpoints written before a source field existed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from frontier_jax.config import load_config
from frontier_jax.train.checkpoint import check_same_data_stream

NEW_SOURCE_FIELDS = ("fim_rate", "fim_spm_share")


def _older_checkpoint_config(current: dict) -> dict:
    """The config as a checkpoint from before the FIM fields records it."""
    saved = copy.deepcopy(current)
    for source in saved["data"]["sources"]:
        for name in NEW_SOURCE_FIELDS:
            del source[name]
    return saved


def test_a_checkpoint_without_a_newer_source_field_resumes_when_the_field_is_at_its_default():
    current = load_config("model/toy").to_dict()
    check_same_data_stream(_older_checkpoint_config(current), current, Path("/run"))


def test_a_newer_source_field_off_its_default_or_an_added_source_is_another_stream():
    current = load_config("model/toy").to_dict()
    saved = _older_checkpoint_config(current)
    current["data"]["sources"][0]["fim_rate"] = 0.1
    with pytest.raises(ValueError, match=r"data\.sources\.0\.fim_rate: checkpoint 0\.0 vs config 0\.1"):
        check_same_data_stream(saved, current, Path("/run"))
    current["data"]["sources"][0]["fim_rate"] = 0.0
    current["data"]["sources"].append({**current["data"]["sources"][1], "name": "more"})
    with pytest.raises(ValueError, match=r"data\.sources\.2\.name: checkpoint None vs config 'more'"):
        check_same_data_stream(saved, current, Path("/run"))
