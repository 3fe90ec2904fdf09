"""Every layout the config validator accepts runs: a grid of stage x data x expert x
micro-batches on the 8 fake CPU devices (the tiny model with 1 dense + 4 MoE blocks, 8 rows of
32 tokens per step, 1f1b on stage > 1).

The validator (`load_config`: the pipeline plan and its micro-batch rule) runs over the whole
grid without compiling anything; the layouts it accepts train 2 steps with `train()` (one by
default, all 17 under `slow`): losses finite, and step 1's loss the same on every layout
(same seed, same data; rtol 1e-5, only the summation order differs).  A pipelined micro-batch
whose rows do not split over the batch axes used to be accepted and then hang in a collective
(exit 134 after 40 s); it is refused on load naming the rule.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from .common import tiny_config

DEVICES = 8
GRID = {
    "stage": (1, 2, 4),
    "data": (1, 2, 4, 8),
    "expert": (1, 2, 4),
    "micro_batches": (1, 2, 4, 8),
}
MODEL = (
    "model.num_layers=5",
    "model.n_routed_experts=4",
    "model.mtp_depth=0",
    "train.steps=2",
    "checkpoint.every=0",
)
# The layout `train()` runs by default (a compile of the pipeline costs ~30 s of CI): a pipeline
# with data-parallel micro-batches of whole rows per data shard, which hung before the executor
# got its micro-batches laid out over the batch axes.  Under `slow` also gradient accumulation
# with a micro-batch (1 row) split 8 ways: allowed without a pipeline, no stage-dependent branch.
DEFAULT_RUNS = {(2, 4, 1, 2)}


def _overrides(stage: int, data: int, expert: int, micro_batches: int) -> list[str]:
    pipeline = ["train.pipeline.schedule=1f1b"] if stage > 1 else []
    return [
        *MODEL,
        f"mesh.stage={stage}",
        f"mesh.data={data}",
        f"mesh.expert={expert}",
        f"train.micro_batches={micro_batches}",
        *pipeline,
    ]


def _validate_grid() -> tuple[dict, dict]:
    """({layout: config} accepted, {layout: error} refused) over the grid's layouts of 8 devices."""
    accepted, refused = {}, {}
    for layout in itertools.product(*GRID.values()):
        stage, data, expert, _ = layout
        if stage * data * expert != DEVICES:
            continue
        try:
            accepted[layout] = tiny_config(*_overrides(*layout))
        except ValueError as err:
            refused[layout] = str(err)
    return accepted, refused


ACCEPTED, REFUSED = _validate_grid()


def test_the_validator_refuses_pipelined_micro_batches_that_do_not_split_over_the_batch_axes():
    assert len(ACCEPTED) + len(REFUSED) == 32
    for (stage, data, expert, m), message in REFUSED.items():
        assert stage > 1 and "\n" not in message, message
        rows, ways = 8 // m, data * expert
        if rows % ways:
            assert message.startswith(
                f"train.micro_batches={m} cuts train.global_batch=8 into micro-batches of {rows} rows"
            )
        else:  # the schedule's own bound: 1f1b streams at least one micro-batch per stage
            assert message.startswith(
                f"train.micro_batches={m}: schedule 1f1b on {stage} stages needs >= {stage}"
            )
    for stage, data, expert, m in ACCEPTED:
        assert stage == 1 or ((8 // m) % (data * expert) == 0 and m >= stage)
    assert (2, 4, 1, 4) in REFUSED  # the layout that hung: 2 rows per micro-batch over data=4
    assert DEFAULT_RUNS <= set(ACCEPTED)


def _runs():
    return [
        pytest.param(
            layout,
            id="stage{}-data{}-expert{}-mb{}".format(*layout),
            marks=() if layout in DEFAULT_RUNS else pytest.mark.slow,
        )
        for layout in sorted(ACCEPTED)
    ]


@pytest.fixture(scope="module")
def first_losses():
    return {}


@pytest.mark.parametrize("layout", _runs())
def test_every_accepted_layout_trains(layout, tmp_path, first_losses):
    from frontier_jax.train.loop import train

    history = train(ACCEPTED[layout], tmp_path / "run", progress=False)
    assert [r["step"] for r in history] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1 for r in history)
    first_losses[layout] = history[0]["loss"]
    np.testing.assert_allclose(history[0]["loss"], next(iter(first_losses.values())), rtol=1e-5)
