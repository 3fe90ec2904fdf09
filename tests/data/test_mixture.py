"""The mixture schedule (`frontier_jax/data/mixture.py`, `batching.py`): each row's source by token
deficit, the per-source token counts and shares (also with document masking, where rows carry
padding), and resume across a change of weights.

Sources here are JSONL files whose documents are made of one letter per source ("a" ... / "b"
...), so the source of every row is read off its tokens, independently of the pipeline."""

import json

import numpy as np
import pytest

from frontier_jax.data import DataStats, MixturePhase, build_train_iterator, continue_documents
from frontier_jax.data.mixture import MixtureSchedule

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")
B, T = 8, 24
# weights a:b = 2:1 for steps 0-3, b alone for 4-6, 2:3 from 7 on (shares that do not divide B,
# so the picks depend on the counts carried across batches)
STAGES = [MixturePhase(4, {"b": 1.0}), MixturePhase(7, {"a": 2.0, "b": 3.0})]
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
    assert [schedule.phase_at(k) for k in (0, 3, 4, 6, 7, 1000)] == [0, 0, 1, 1, 2, 2]
    first_at_zero = MixtureSchedule.from_config(letters(stages=[MixturePhase(0, {"b": 1.0})]))
    assert first_at_zero.start_steps == (0,) and first_at_zero.weights.tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("full_rows", [True, False])
def test_picks_keep_every_prefix_within_about_a_row_of_the_weights(full_rows):
    """Random mixtures of 2-6 sources, some of weight 0, rows of T real tokens or of 1..T (each
    source its own range): after every row, each source's tokens are within 1.5 T of weight x
    all tokens (the docstring's measured bound is 1.06 T), and a source of weight 0 is never
    drawn."""
    rng = np.random.default_rng(0)
    row = 64
    for _ in range(100):
        n = int(rng.integers(2, 7))
        weights = rng.random(n) ** 3 * (rng.random(n) > 0.2) + np.eye(n)[0] * 1e-3
        shortest = np.full(n, row) if full_rows else rng.integers(1, row + 1, n)
        schedule = MixtureSchedule([str(i) for i in range(n)], [0], weights[None])
        tokens = [0] * n
        for _ in range(300):
            source = schedule.pick(0, tokens, row)
            tokens[source] += int(rng.integers(shortest[source], row + 1))
            assert np.abs(np.asarray(tokens) - schedule.weights[0] * sum(tokens)).max() < 1.5 * row
        assert all(t == 0 for t, w in zip(tokens, weights) if w == 0)


def _check_naive_picks(batches, seq_len: int) -> None:
    """The documented rule in a plain loop over the rows yielded: within a stage, each row comes
    from the source with the largest w (S + T) - t over the real tokens t of the stage's earlier
    rows (first on ties)."""
    tokens, stage = {}, None
    for step, batch in enumerate(batches):
        if _stage_share(step) != stage:
            stage, tokens = _stage_share(step), {"a": 0, "b": 0}
        total = tokens["a"] + tokens["b"] + seq_len
        for source, seg in zip(_row_sources(batch), batch["segment_ids"][batch["segment_ids"].any(axis=1)]):
            deficit = {"a": stage * total - tokens["a"], "b": (1 - stage) * total - tokens["b"]}
            assert source == ("a" if deficit["a"] >= deficit["b"] else "b"), (step, tokens)
            tokens[source] += int((seg > 0).sum())
            total = tokens["a"] + tokens["b"] + seq_len


@pytest.mark.parametrize("mask_documents", [False, True])
def test_each_batch_draws_its_rows_with_the_weights_of_its_step(letters, mask_documents):
    it = build_train_iterator(
        letters(stages=STAGES, mask_documents=mask_documents), seq_len=T, global_batch=B
    )
    batches = [next(it) for _ in range(12)]
    _check_naive_picks(batches, T)
    for step, batch in enumerate(batches):
        sources = _row_sources(batch)
        if not mask_documents:  # full rows: the row shares are the token shares
            assert abs(sources.count("a") - B * _stage_share(step)) < 2, (step, sources)


@pytest.mark.parametrize("mask_documents", [False, True])
def test_token_counts_are_the_real_tokens_of_each_source_and_shares_follow_the_targets(
    letters, mask_documents
):
    it = build_train_iterator(
        letters(stages=STAGES, mask_documents=mask_documents), seq_len=T, global_batch=B
    )
    tokens = {"a": 0, "b": 0}
    asked = {"a": 0.0, "b": 0.0}  # tokens the schedule asks for: each batch's tokens x its weights
    for step in range(10):
        batch = next(it)
        real = batch["segment_ids"][batch["segment_ids"].any(axis=1)] > 0
        for source, row in zip(_row_sources(batch), real):
            tokens[source] += int(row.sum())
        asked["a"] += int(real.sum()) * _stage_share(step)
        asked["b"] += int(real.sum()) * (1 - _stage_share(step))
    stats = DataStats.from_state(json.loads(json.dumps(it.get_state())))
    assert stats.tokens == tokens
    total = sum(tokens.values())
    for source in "ab":
        assert stats.target_share[source] == pytest.approx(asked[source] / total)
        metrics = stats.as_metrics()
        assert metrics[f"data/{source}/tokens"] == tokens[source]
        assert metrics[f"data/{source}/token_share"] == pytest.approx(tokens[source] / total)
    # within about a row's tokens of the targets, full rows or rows with padding
    assert abs(stats.token_share("a") - stats.target_share["a"]) * total < 1.5 * T


@pytest.mark.parametrize("weight_a", [0.5, 0.25])
def test_token_shares_follow_the_weights_when_document_masking_pads_rows(jsonl_config, weight_a):
    """Documents of 40 and 200 characters at seq_len 64 with mask_documents=true: a row of "a"
    holds one 41-token document and 23 padding tokens, a row of "b" up to 64 tokens.  Picked by
    token deficit, each source's real tokens stay within 1.5 rows (1.5 x 64 tokens) of its
    weight x all tokens after every batch (picked by rows, "a" got 0.395 of the tokens at 0.5)."""
    cfg = jsonl_config(
        {"a": ["a" * 40] * 20, "b": ["b" * 200] * 20},
        weights={"a": weight_a, "b": 1 - weight_a},
        mask_documents=True,
        shuffle_window=32,
    )
    it = build_train_iterator(cfg, seq_len=64, global_batch=8)
    tokens = {"a": 0, "b": 0}
    for step in range(12):
        batch = next(it)
        for source, seg in zip(_row_sources(batch), batch["segment_ids"]):
            tokens[source] += int((seg > 0).sum())
        total = sum(tokens.values())
        assert abs(tokens["a"] - weight_a * total) < 1.5 * 64, (step, tokens)
    stats = DataStats.from_state(it.get_state())
    assert stats.tokens == tokens and stats.target_share["a"] == pytest.approx(weight_a)
    assert abs(stats.token_share("a") - weight_a) < 1.5 * 64 / total  # 0.019 after 12 x 8 rows


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


def test_a_state_saved_when_the_mixture_counted_rows_resumes_with_full_rows(letters):
    """States saved before the picks counted tokens hold rows per stage ("stage_rows") and tokens
    per source: with full rows (mask_documents=false) they resume to the same batches."""
    cfg = letters(stages=STAGES)
    it = build_train_iterator(cfg, seq_len=T, global_batch=B)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    position = state["frontier_batch_position"]
    stage_tokens = position.pop("stage_tokens")
    position["stage_rows"] = [[t // T for t in counts] for counts in stage_tokens]
    position["tokens"] = np.sum(stage_tokens, axis=0).tolist()
    resumed = build_train_iterator(cfg, seq_len=T, global_batch=B)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


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
        stages=[MixturePhase(3, {"b": 1.0})],
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
