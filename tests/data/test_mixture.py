"""The mixture schedule (`frontier_jax/data/mixture.py`, `batching.py`): each row's source, the
per-source token counts, and resume across a change of weights.

Sources here are JSONL files whose documents are made of one letter per source ("a" ... / "b"
...), so the source of every row is read off its tokens, independently of the pipeline."""

import json

import numpy as np
import pytest

from frontier_jax.data import DataStats, MixtureStage, build_train_iterator, continue_documents
from frontier_jax.data.mixture import MixtureSchedule

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
B, T = 8, 24
# weights a:b = 2:1 for steps 0-3, b alone for 4-6, 2:3 from 7 on (shares that do not divide B,
# so the picks depend on the counts carried across batches)
STAGES = [MixtureStage(4, {"b": 1.0}), MixtureStage(7, {"a": 2.0, "b": 3.0})]
WANT_A = {0: 2 / 3, 4: 0.0, 7: 0.4}


@pytest.fixture
def letters(jsonl_config):
    """letters(**data_fields) -> DataConfig of sources a (weight 2) and b (weight 1)."""

    def make(**fields):
        docs = {name: [name * (5 + (7 * i) % 40) for i in range(60)] for name in "ab"}
        return jsonl_config(docs, weights={"a": 2.0, "b": 1.0}, **{"shuffle_window": 32, **fields})

    return make


def _row_sources(batch) -> list[str]:
    """The letter of each real row (all its non-special tokens are one letter); padding rows left out."""
    out = []
    for ids, seg in zip(batch["input_ids"], batch["segment_ids"]):
        if not seg.any():
            continue
        letters = {chr(i) for i in ids[seg > 0] if i < 256}
        assert len(letters) == 1, letters  # a row holds one source
        out.append(letters.pop())
    return out


def _stage_share(step: int) -> float:
    return WANT_A[max(s for s in WANT_A if s <= step)]


def test_schedule_from_config_normalises_and_finds_the_stage_of_each_step(letters):
    schedule = MixtureSchedule.from_config(letters(stages=STAGES))
    assert schedule.names == ("a", "b") and schedule.start_steps == (0, 4, 7)
    np.testing.assert_allclose(schedule.weights, [[2 / 3, 1 / 3], [0.0, 1.0], [0.4, 0.6]])
    assert [schedule.stage_at(k) for k in (0, 3, 4, 6, 7, 1000)] == [0, 0, 1, 1, 2, 2]
    first_at_zero = MixtureSchedule.from_config(letters(stages=[MixtureStage(0, {"b": 1.0})]))
    assert first_at_zero.start_steps == (0,) and first_at_zero.weights.tolist() == [[0.0, 1.0]]


def test_picks_keep_every_prefix_within_about_a_row_of_the_weights():
    """Random mixtures of 2-6 sources, some of weight 0: after every row, each source's count
    is within 1.5 rows of weight x rows (the docstring's measured bound is 1.05), and a source
    of weight 0 is never drawn."""
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(2, 7))
        weights = rng.random(n) ** 3 * (rng.random(n) > 0.2) + np.eye(n)[0] * 1e-3
        schedule = MixtureSchedule([str(i) for i in range(n)], [0], weights[None])
        counts = [0] * n
        for j in range(1, 301):
            counts[schedule.pick(0, counts)] += 1
            assert np.abs(np.asarray(counts) - schedule.weights[0] * j).max() < 1.5
        assert all(c == 0 for c, w in zip(counts, weights) if w == 0)


def _naive_sources(steps: int) -> list[list[str]]:
    """The documented rule in a plain loop: within a stage, row j comes from the source with the
    largest w (j + 1) - c (first on ties)."""
    out, counts, stage = [], {}, None
    for step in range(steps):
        if _stage_share(step) != stage:
            stage, counts = _stage_share(step), {"a": 0, "b": 0}
        batch = []
        for _ in range(B):
            j = counts["a"] + counts["b"]
            deficit = {"a": stage * (j + 1) - counts["a"], "b": (1 - stage) * (j + 1) - counts["b"]}
            name = "a" if deficit["a"] >= deficit["b"] else "b"
            counts[name] += 1
            batch.append(name)
        out.append(batch)
    return out


def test_each_batch_draws_its_rows_with_the_weights_of_its_step(letters):
    it = build_train_iterator(letters(stages=STAGES), seq_len=T, global_batch=B)
    got = [_row_sources(next(it)) for _ in range(12)]
    assert got == _naive_sources(12)
    for step, sources in enumerate(got):
        assert abs(sources.count("a") - B * _stage_share(step)) < 2, (step, sources)


@pytest.mark.parametrize("mask_documents", [False, True])
def test_token_counts_are_the_real_tokens_of_each_source_and_shares_follow_the_targets(
    letters, mask_documents
):
    it = build_train_iterator(
        letters(stages=STAGES, mask_documents=mask_documents), seq_len=T, global_batch=B
    )
    tokens = {"a": 0, "b": 0}
    rows = {"a": 0.0, "b": 0.0}  # rows the schedule asks for
    for step in range(10):
        batch = next(it)
        for source, seg in zip(_row_sources(batch), batch["segment_ids"]):
            tokens[source] += int((seg > 0).sum())
        rows["a"] += B * _stage_share(step)
        rows["b"] += B * (1 - _stage_share(step))
    stats = DataStats.from_state(json.loads(json.dumps(it.get_state())))
    assert stats.tokens == tokens
    for source in "ab":
        assert stats.target_share[source] == pytest.approx(rows[source] / (10 * B))
        metrics = stats.as_metrics()
        assert metrics[f"data/{source}/tokens"] == tokens[source]
        assert metrics[f"data/{source}/token_share"] == pytest.approx(tokens[source] / sum(tokens.values()))
    if not mask_documents:  # full rows: token shares are row shares, within about a row of the targets
        assert abs(stats.token_share("a") - stats.target_share["a"]) * 10 * B < 1.5


@pytest.mark.parametrize("mask_documents", [False, True])
@pytest.mark.parametrize("saved_after", [2, 4, 5, 8], ids=["before", "at", "after", "after_second"])
def test_resume_across_a_weight_change_yields_the_uninterrupted_batches(letters, mask_documents, saved_after):
    """Saved before the change at step 4, right at it, inside the b-only stage and after the
    second change: the restored iterator yields the straight run's batches through both changes."""
    cfg = letters(stages=STAGES, mask_documents=mask_documents)
    straight = build_train_iterator(cfg, seq_len=T, global_batch=B)
    expected = [next(straight) for _ in range(11)]
    it = build_train_iterator(cfg, seq_len=T, global_batch=B)
    for _ in range(saved_after):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = build_train_iterator(cfg, seq_len=T, global_batch=B)
    resumed.set_state(state)
    for step in range(saved_after, 11):
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], expected[step][key], err_msg=f"step {step} {key}")


def test_a_state_of_another_schedule_is_refused_naming_data_stages(letters):
    it = build_train_iterator(letters(stages=STAGES), seq_len=T, global_batch=B)
    next(it)
    state = it.get_state()
    other = build_train_iterator(letters(stages=STAGES[:1]), seq_len=T, global_batch=B)
    with pytest.raises(ValueError, match="another number of mixture stages than data.stages gives now, 2"):
        other.set_state(state)


def test_a_source_of_weight_zero_until_its_stage_is_not_read_before(jsonl_config):
    cfg = jsonl_config(
        {"a": ["a" * 30] * 20, "b": ["b" * 30] * 20},
        weights={"a": 1.0, "b": 0.0},
        stages=[MixtureStage(3, {"b": 1.0})],
        shuffle_window=32,
    )
    it = build_train_iterator(cfg, seq_len=T, global_batch=4)
    assert [set(_row_sources(next(it))) for _ in range(5)] == [{"a"}] * 3 + [{"b"}] * 2


def test_a_pipeline_of_other_rows_continues_the_step_count_the_schedule_and_the_token_counts(letters):
    """A context stage rebuilds the pipeline at another seq_len and batch (`continue_documents`):
    its first batch is the batch of step 5, so the schedule (b alone for steps 4-6, then 2:3)
    and the batch-size ramp see the run's step, and the token counts go on from the first's."""
    cfg = letters(stages=STAGES)
    first = build_train_iterator(cfg, seq_len=T, global_batch=B)
    for _ in range(5):
        next(first)
    before = DataStats.from_state(first.get_state()).tokens
    second = build_train_iterator(cfg, seq_len=2 * T, global_batch=5, rows_at=lambda k: 3 if k < 7 else 5)
    continue_documents(second, first.get_state())
    batches = [next(second) for _ in range(4)]  # steps 5, 6, 7, 8
    assert [_row_sources(b) for b in batches[:2]] == [["b"] * 3, ["b"] * 3]
    assert [int(b["segment_ids"].any(axis=1).sum()) for b in batches] == [3, 3, 5, 5]
    assert sorted(_row_sources(batches[2]) + _row_sources(batches[3])) == ["a"] * 4 + ["b"] * 6
    tokens = DataStats.from_state(second.get_state()).tokens
    assert tokens["a"] == before["a"] + 4 * 2 * T
    assert tokens["b"] == before["b"] + 12 * 2 * T
