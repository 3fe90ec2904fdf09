import json

import numpy as np
import pytest

from frontier_jax.data import (
    DataConfig,
    DataStats,
    SourceConfig,
    build_train_iterator,
    restore_iterator_state,
    save_iterator_state,
)

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert sorted(g) == sorted(KEYS)
        for key in KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_batch_is_a_dict_of_int32_arrays_of_the_global_batch():
    batch = next(build_train_iterator(DataConfig(), seq_len=16, global_batch=6))
    assert sorted(batch) == sorted(KEYS)
    assert all(v.dtype == np.int32 and v.shape == (6, 16) for v in batch.values())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"seq_len": 1}, "seq_len=1"),
        ({"global_batch": 0}, "global_batch=0"),
        ({"num_epochs": 0}, "num_epochs=0"),
    ],
)
def test_invalid_arguments_are_rejected_by_name_before_any_file_is_read(kwargs, fragment):
    cfg = DataConfig(sources=[SourceConfig("web", "jsonl", "/does/not/exist.jsonl")])
    args = {"seq_len": 8, "global_batch": 4, **kwargs}
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[")):
        build_train_iterator(cfg, **args)


def test_nonpositive_weight_is_rejected_naming_the_field():
    cfg = DataConfig(sources=[SourceConfig("m", "embedded_math", weight=-1.0)])
    with pytest.raises(ValueError, match=r"data.sources\[0\].weight=-1.0"):
        build_train_iterator(cfg, seq_len=8, global_batch=4)


@pytest.mark.parametrize("taken", [0, 1, 7], ids=["fresh", "after_1_batch", "after_7_batches"])
@pytest.mark.parametrize("mask_documents", [False, True])
def test_restored_iterator_yields_exactly_the_next_batches(mask_documents, taken, tmp_path):
    """Saved before any batch, after one and after several: the screen and packer states
    differ (nothing read yet, the first records, partial documents carried)."""
    cfg = DataConfig(mask_documents=mask_documents, max_document_chars=300)
    it = build_train_iterator(cfg, seq_len=48, global_batch=4)
    _take(it, taken)
    save_iterator_state(it, tmp_path / "data.json")
    expected = _take(it, 3)
    resumed = build_train_iterator(cfg, seq_len=48, global_batch=4)
    restore_iterator_state(resumed, tmp_path / "data.json")
    _assert_same_batches(_take(resumed, 3), expected)


def test_same_config_gives_the_same_batches_and_another_seed_other_ones():
    first = _take(
        build_train_iterator(DataConfig(seed=1, max_document_chars=100), seq_len=32, global_batch=4), 2
    )
    again = _take(
        build_train_iterator(DataConfig(seed=1, max_document_chars=100), seq_len=32, global_batch=4), 2
    )
    other = _take(
        build_train_iterator(DataConfig(seed=2, max_document_chars=100), seq_len=32, global_batch=4), 2
    )
    _assert_same_batches(again, first)
    assert not np.array_equal(other[0]["input_ids"], first[0]["input_ids"])


def test_mixture_follows_the_weights_over_many_documents(jsonl_config):
    cfg = jsonl_config(
        {"a": [f"a{i}" for i in range(100)], "b": [f"b{i}" for i in range(100)]},
        weights={"a": 3.0, "b": 1.0},
        seed=5,
    )
    it = build_train_iterator(cfg, seq_len=64, global_batch=8)
    firsts = []
    for batch in _take(it, 20):
        ids = batch["input_ids"]
        firsts += ids[:, 1:][ids[:, :-1] == 257].tolist()  # the byte after each <bos>
    share_a = firsts.count(ord("a")) / len(firsts)
    assert len(firsts) > 1000 and abs(share_a - 0.75) < 0.05


def test_finite_epochs_end_the_iterator(jsonl_config):
    cfg = jsonl_config({"a": ["x" * 30] * 10})
    batches = list(build_train_iterator(cfg, seq_len=16, global_batch=2, num_epochs=2))
    real_tokens = sum(int(b["loss_mask"].sum()) for b in batches)
    assert 0 < real_tokens <= 2 * 10 * 31 and len(batches) == (2 * 10 * 31) // (16 * 2)


def test_data_stats_are_read_from_the_iterator_state(write_jsonl):
    path = write_jsonl("web.jsonl", [{"text": "good " * 5}, b"{bad", {"text": ""}] * 20)
    cfg = DataConfig(sources=[SourceConfig("web", "jsonl", path)], shuffle=False)
    it = build_train_iterator(cfg, seq_len=16, global_batch=2)
    _take(it, 10)
    stats = DataStats.from_state(json.loads(json.dumps(it.get_state())))
    counts = stats.counts["web"]
    assert counts["documents"] > 3
    assert (
        abs(counts["invalid_json"] - counts["documents"]) <= 1
        and abs(counts["empty"] - counts["documents"]) <= 1
    )


def test_worker_processes_give_resumable_batches_and_stats_summed_over_workers():
    cfg = DataConfig(
        sources=[SourceConfig("math", "embedded_math")],
        worker_count=2,
        max_document_chars=20,
        shuffle_window=4,
    )
    it = build_train_iterator(cfg, seq_len=32, global_batch=2)
    try:
        _take(it, 4)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 2)
        it.set_state(state)
        _assert_same_batches(_take(it, 2), expected)
    finally:
        it.close()
    assert sum(c["documents"] for c in DataStats.from_state(state).counts.values()) >= 2


@pytest.mark.parametrize("mask_documents", [False, True])
def test_restored_iterator_over_chats_and_texts_yields_exactly_the_next_batches(
    mask_documents, write_jsonl, tmp_path
):
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"q{i} " * (i % 5 + 1)},
                {"role": "assistant", "content": f"a{i} " * (i % 7 + 1)},
            ]
        }
        for i in range(40)
    ]
    cfg = DataConfig(
        sources=[
            SourceConfig("chat", "jsonl", write_jsonl("c.jsonl", chats), format="chat"),
            SourceConfig("math", "embedded_math"),
        ],
        mask_documents=mask_documents,
    )
    it = build_train_iterator(cfg, seq_len=32, global_batch=4)
    _take(it, 5)
    save_iterator_state(it, tmp_path / "data.json")
    expected = _take(it, 3)
    assert any(((b["loss_mask"] == 0) & (b["segment_ids"] > 0)).any() for b in expected)  # user turns
    resumed = build_train_iterator(cfg, seq_len=32, global_batch=4)
    restore_iterator_state(resumed, tmp_path / "data.json")
    _assert_same_batches(_take(resumed, 3), expected)
