"""The `mesh:` section (frontier_jax/parallel/config.py): pipeline stages are refused until they
exist, and no rules table shards anything over `stage`."""

from __future__ import annotations

import pytest

from frontier_jax.config import load_config
from frontier_jax.parallel.rules import RULE_SETS


@pytest.mark.parametrize("stage", [2, 4])
def test_stage_above_one_is_rejected_naming_the_field_and_the_alternative(stage):
    with pytest.raises(
        ValueError,
        match=rf"^mesh\.stage={stage}: pipeline stages are not implemented yet.*"
        r"mesh\.fsdp or mesh\.data instead$",
    ):
        load_config("model/toy", [f"mesh.stage={stage}", "mesh.data=1"])
    assert load_config("model/toy", ["mesh.stage=1"]).mesh.stage == 1


@pytest.mark.parametrize("name", sorted(RULE_SETS))
def test_no_rules_table_maps_a_logical_axis_to_stage(name):
    assert all("stage" not in mesh_axes for mesh_axes in RULE_SETS[name].values()), RULE_SETS[name]
    assert RULE_SETS[name]["layers"] == ()  # stacked layers stay whole on every device


def test_unknown_rules_table_names_the_field_and_the_tables():
    with pytest.raises(
        ValueError,
        match=r"^mesh\.rules='pipeline' is invalid: allowed values are "
        r"default, replicated$",
    ):
        load_config("model/toy", ["mesh.rules=pipeline"])
