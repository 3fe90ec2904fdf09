"""The stage plan (frontier_jax/parallel/pipeline/plan.py): the visible rule that cuts a
DeepSeek-V3-shaped stack into chunks, bad pipeline configs refused when the config is loaded
(before anything compiles) naming the fields, the sizes and the fix, and `describe --mesh`
printing layers per stage with the simulator's figures."""

from __future__ import annotations

import json

import pytest

from frontier_jax import cli
from frontier_jax.config import load_config
from frontier_jax.parallel.pipeline.plan import STAGE_COSTS, build_pipeline_plan, describe_plan, pipeline_plan
from frontier_jax.parallel.pipeline.simulate import simulate


def test_v3_shaped_stack_splits_moe_blocks_into_chunks_with_both_ends_on_the_outer_chunks():
    # 61 blocks: 3 dense + 58 MoE would not split; 67 = 3 dense + 64 MoE into 16 chunks of 4
    plan = build_pipeline_plan("dualpipev", 8, 16, num_layers=67, first_k_dense=3, mtp_depth=1)
    assert (plan.chunks, plan.layers_per_chunk) == (16, 4)
    blocks = [list(plan.chunk_blocks(c)) for c in range(plan.chunks)]
    assert blocks[0] == [3, 4, 5, 6] and blocks[-1] == [63, 64, 65, 66]
    assert sum(blocks, []) == list(range(3, 67))  # every MoE block once, in order
    # the V: rank 0 holds chunks 0 and 15, so both ends
    assert plan.rank_parts(0) == [
        "chunk 0: embedding, dense blocks 0-2, MoE blocks 3-6",
        "chunk 15: MoE blocks 63-66, final norm, head, loss, MTP x1",
    ]
    assert plan.rank_parts(7) == ["chunk 7: MoE blocks 31-34", "chunk 8: MoE blocks 35-38"]
    loop = build_pipeline_plan("1f1b", 4, 4, num_layers=9, first_k_dense=1)
    assert [loop.rank_parts(r) for r in (0, 3)] == [
        ["chunk 0: embedding, dense blocks 0-0, MoE blocks 1-2"],
        ["chunk 3: MoE blocks 7-8, final norm, head, loss"],
    ]


def test_describe_plan_reports_the_simulator_and_the_executor_buffers():
    plan = build_pipeline_plan("1f1b", 4, 8, num_layers=9, first_k_dense=1)
    d = describe_plan(plan)  # one chunk per rank: the stage costs as they are
    sim = simulate(plan.schedule, STAGE_COSTS)
    assert d["bubble_fraction"] == pytest.approx(sim.bubble_fraction)
    # 1F1B's bubble (P-1)(F+B) per rank over a makespan of (M+P-1)(F+B)
    assert d["bubble_fraction"] == pytest.approx(3 / 11)
    assert d["peak_live"] == [4, 3, 2, 1] == list(sim.peak_live)
    table = plan.table
    assert d["buffer_slots"] == 2 * table.stash_slots + table.act_slots + table.grad_slots
    assert d["ticks"] == table.ticks and d["costs"]["F"] == STAGE_COSTS.F


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["mesh.stage=2", "mesh.data=1"],
            r"^mesh\.stage=2 needs a pipeline schedule: set train\.pipeline\.schedule to one of gpipe, 1f1b, "
            r"interleaved-1f1b, zb-h1, dualpipev",
        ),
        (
            ["mesh.stage=2", "train.pipeline.schedule=zb"],
            r"^train\.pipeline\.schedule='zb' is invalid: allowed values are gpipe, 1f1b, interleaved-1f1b, "
            r"zb-h1, dualpipev$",
        ),
        (
            [
                "mesh.stage=4",
                "model.num_layers=9",
                "train.pipeline.schedule=dualpipev",
                "train.micro_batches=4",
            ],
            r"^train\.micro_batches=4: schedule dualpipev on 4 stages needs >= 8; raise train\.micro_batches$",
        ),
        (
            [
                "mesh.stage=4",
                "model.num_layers=9",
                "train.pipeline.schedule=interleaved-1f1b",
                "train.micro_batches=6",
                "train.global_batch=12",
            ],
            r"^train\.micro_batches=6: schedule interleaved-1f1b on 4 stages needs >= 4 and a multiple of 4",
        ),
        (
            ["mesh.stage=4", "train.pipeline.schedule=1f1b", "train.micro_batches=4"],  # toy: 1 dense + 2 MoE
            r"^model\.num_layers=3 with model\.first_k_dense=1 leaves 2 MoE blocks; schedule 1f1b on "
            r"mesh\.stage=4 cuts them into 4 chunks of equal depth .*use a multiple of 4 MoE blocks, e\.g\. "
            r"model\.num_layers=5 or 9$",
        ),
        (
            [
                "mesh.stage=2",
                "model.first_k_dense=3",
                "train.pipeline.schedule=gpipe",
                "train.micro_batches=2",
            ],
            r"^model\.num_layers=3 with model\.first_k_dense=3 leaves 0 MoE blocks",
        ),
        (  # 16 rows in 8 micro-batches of 2 over data=4: hung in a collective, then aborted
            ["mesh.stage=2", "mesh.data=4", "train.pipeline.schedule=gpipe", "train.micro_batches=8"],
            r"^train\.micro_batches=8 cuts train\.global_batch=16 into micro-batches of 2 rows, which the "
            r"4-way batch split over mesh axes \['data'\] \(data=4\) cannot divide: a pipeline needs "
            r"micro-batch rows that are a multiple of 4 .*; use train\.micro_batches=4 or "
            r"train\.global_batch=32, or a smaller batch split$",
        ),
        (  # with mesh.data=-1 the known axes are checked here, the rest when the mesh is built
            [
                "mesh.stage=2",
                "mesh.expert=2",
                "model.n_routed_experts=8",
                "train.pipeline.schedule=1f1b",
                "train.micro_batches=16",
            ],
            r"^train\.micro_batches=16 cuts train\.global_batch=16 into micro-batches of 1 rows, which the "
            r"2-way batch split over mesh axes \['expert'\] \(expert=2\) cannot divide",
        ),
        (
            ["train.pipeline.schedule=1f1b", "train.micro_batches=2"],
            r"^train\.pipeline\.schedule=1f1b needs pipeline stages, but mesh\.stage=1: set mesh\.stage > 1 "
            r"to pipeline, or remove train\.pipeline\.schedule",
        ),
    ],
)
def test_bad_pipeline_configs_are_refused_on_load_naming_fields_sizes_and_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config("model/toy", overrides)


def test_a_schedule_that_fits_loads_and_plans():
    cfg = load_config(
        "model/toy",
        [
            "mesh.stage=4",
            "mesh.data=2",
            "model.num_layers=5",
            "train.pipeline.schedule=zb-h1",
            "train.micro_batches=4",
        ],
    )
    plan = pipeline_plan(cfg.train, cfg.mesh, cfg.model)
    assert (plan.stages, plan.micro_batches, plan.chunks, plan.layers_per_chunk) == (4, 4, 4, 1)
    toy = load_config("model/toy")
    assert pipeline_plan(toy.train, toy.mesh, toy.model) is None


def test_train_cli_refuses_stage_without_schedule_in_one_line(capsys, tmp_path):
    assert (
        cli.main(["train", "--config", "model/toy", "--run-dir", str(tmp_path / "run"), "mesh.stage=2"]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: mesh.stage=2 needs a pipeline schedule") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_describe_mesh_prints_layers_per_stage_bubble_and_memory(capsys):
    args = ["describe", "--config", "model/toy", "--mesh", "mesh/cpu-8", "mesh.stage=2", "mesh.expert=2"]
    args += [
        "mesh.data=2",
        "model.num_layers=5",
        "train.pipeline.schedule=dualpipev",
        "train.micro_batches=4",
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "pipeline dualpipev on 2 stages, 4 micro-batches: 4 chunks of 1 MoE blocks" in out
    assert (
        "rank 0: chunk 0: embedding, dense blocks 0-0, MoE blocks 1-1; "
        "chunk 3: MoE blocks 4-4, final norm, head, loss, MTP x1"
    ) in out
    assert "rank 1: chunk 1: MoE blocks 2-2; chunk 2: MoE blocks 3-3" in out
    assert (
        "bubble" in out
        and "executor buffers" in out
        and "per device on mesh stage 2 x data 2 x expert 2" in out
    )
    assert cli.main(args + ["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    plan = info["pipeline"]
    assert plan["ranks"][1] == ["chunk 1: MoE blocks 2-2", "chunk 2: MoE blocks 3-3"]
    assert 0 < plan["bubble_fraction"] < 1 and plan["ticks"] > 0
