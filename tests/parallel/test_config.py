"""The `mesh:` section (frontier_jax/parallel/config.py) with pipeline stages: mesh.stage > 1
runs only with a schedule (`train.pipeline.schedule`), and the rules tables split nothing but
the MoE stack's layers over `stage`."""

from __future__ import annotations

import pytest

from frontier_jax.config import load_config
from frontier_jax.parallel.rules import RULE_SETS


@pytest.mark.parametrize("stage", [2, 4])
def test_stage_above_one_without_a_schedule_names_the_field_and_the_alternatives(stage):
    with pytest.raises(
        ValueError,
        match=rf"^mesh\.stage={stage} needs a pipeline schedule: set train\.pipeline\.schedule to one of "
        r"gpipe, 1f1b, interleaved-1f1b, zb-h1, dualpipev .*or keep mesh\.stage=1",
    ):
        load_config("model/toy", [f"mesh.stage={stage}", "mesh.data=1"])
    assert load_config("model/toy", ["mesh.stage=1"]).mesh.stage == 1


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_only_the_moe_stack_layers_map_to_stage(name):
    on_stage = {logical for logical, mesh_axes in RULE_SETS[name].items() if "stage" in mesh_axes}
    assert on_stage == {"layers"}, RULE_SETS[name]
    assert RULE_SETS[name]["dense_layers"] == RULE_SETS[name]["mtp_layers"] == ()  # on every stage


def test_unknown_rules_table_names_the_field_and_the_tables():
    with pytest.raises(
        ValueError,
        match=r"^mesh\.rules='pipeline' is invalid: allowed values are "
        r"default, replicated$",
    ):
        load_config("model/toy", ["mesh.rules=pipeline"])
