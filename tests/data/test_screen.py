import json
import logging
import re

import pytest

from frontier_jax.data import (
    DataConfig,
    DataError,
    DataStats,
    SourceConfig,
    build_train_iterator,
    source_documents,
)

BAD_DATA_LINES = [
    {"text": "good one"},
    b'\xff\xfe{"text": "bad bytes"}',  # line 2: invalid UTF-8
    b"{not json",  # line 3: invalid JSON
    {"other": "no text"},  # line 4: missing field
    {"text": ""},  # line 5: empty
    {"text": " \n\t "},  # line 6: empty (whitespace only)
    {"text": "ab"},  # line 7: too short (min 3)
    {"text": "0123456789" * 2 + "abcde"},  # line 8: over-long (max 10): split
    [1, 2],  # line 9: JSON but not an object
    {"text": 5},  # line 10: field is not text
    {"text": "good two"},
]


def _documents_and_stats(path, epochs=1):
    cfg = DataConfig(
        sources=[SourceConfig("web", "jsonl", path)],
        shuffle=False,
        min_document_chars=3,
        max_document_chars=10,
    )
    it = iter(source_documents(cfg, cfg.sources[0], num_epochs=epochs))
    docs = list(it)
    return docs, DataStats.from_state(it.get_state())


def test_bad_records_are_skipped_and_counted_per_reason(write_jsonl):
    docs, stats = _documents_and_stats(write_jsonl("web.jsonl", BAD_DATA_LINES))
    assert docs == ["good one", "0123456789", "0123456789", "abcde", "good two"]
    assert stats.counts == {
        "web": {
            "documents": 3,
            "split_overlong": 1,
            "invalid_utf8": 1,
            "invalid_json": 2,
            "missing_field": 2,
            "wrong_type": 0,
            "empty_content": 0,
            "no_assistant_turn": 0,
            "empty": 2,
            "too_short": 1,
        }
    }
    assert stats.skipped("web") == 8
    assert stats.as_metrics()["data/web/invalid_json"] == 2


def test_counts_accumulate_over_epochs(write_jsonl):
    _, stats = _documents_and_stats(write_jsonl("web.jsonl", BAD_DATA_LINES), epochs=2)
    assert stats.counts["web"]["invalid_json"] == 4 and stats.counts["web"]["documents"] == 6


def test_first_skipped_records_are_logged_with_file_and_line(write_jsonl, caplog):
    path = write_jsonl("web.jsonl", BAD_DATA_LINES)
    with caplog.at_level(logging.WARNING, logger="frontier_jax.data.screen"):
        _documents_and_stats(path)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5  # only the first few per source
    assert f"{path}:2 (invalid_utf8)" in messages[0] and f"{path}:3 (invalid_json)" in messages[1]


def test_resume_in_the_middle_of_a_split_document_continues_pieces_and_counts(write_jsonl):
    path = write_jsonl("web.jsonl", BAD_DATA_LINES)
    cfg = DataConfig(
        sources=[SourceConfig("web", "jsonl", path)],
        shuffle=False,
        min_document_chars=3,
        max_document_chars=10,
    )
    dataset = source_documents(cfg, cfg.sources[0], num_epochs=1)
    it = iter(dataset)
    for _ in range(2):  # "good one", first piece of the split document
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    resumed = iter(dataset)
    resumed.set_state(state)
    assert list(resumed) == rest == ["0123456789", "abcde", "good two"]
    assert DataStats.from_state(resumed.get_state()) == DataStats.from_state(it.get_state())


def test_state_of_an_exhausted_source_restores_to_an_exhausted_source(write_jsonl):
    path = write_jsonl("web.jsonl", BAD_DATA_LINES)
    cfg = DataConfig(sources=[SourceConfig("web", "jsonl", path)], shuffle=False)
    dataset = source_documents(cfg, cfg.sources[0], num_epochs=1)
    it = iter(dataset)
    list(it)
    resumed = iter(dataset)
    resumed.set_state(it.get_state())
    assert list(resumed) == []


def test_a_source_of_only_bad_records_is_an_error_naming_it_not_a_hang(write_jsonl):
    """Repeated forever, a source whose every record is skipped would make `next` spin for ever;
    after data.max_skipped_in_a_row skipped records in a row it raises DataError instead."""
    path = write_jsonl("bad.jsonl", [{"other": "no text"}, {"text": "  "}, b"{oops"])
    cfg = DataConfig(sources=[SourceConfig("bad", "jsonl", path)], max_skipped_in_a_row=50)
    it = iter(source_documents(cfg, cfg.sources[0], num_epochs=None))
    with pytest.raises(DataError, match=r"data source 'bad' gave no document in its last 50 records") as err:
        next(it)
    counts = dict(
        kv.split("=") for kv in re.search(r"counts so far: ([^)]*)\)", str(err.value))[1].split(", ")
    )
    assert set(counts) == {"missing_field", "empty", "invalid_json"} and sum(map(int, counts.values())) == 50


def test_the_skip_bound_counts_only_records_in_a_row(write_jsonl):
    """One good document among 9 bad records per epoch never trips a bound of 10."""
    path = write_jsonl("sparse.jsonl", [{"text": "good"}] + [{"text": ""}] * 9)
    cfg = DataConfig(sources=[SourceConfig("sparse", "jsonl", path)], shuffle=False, max_skipped_in_a_row=10)
    it = iter(source_documents(cfg, cfg.sources[0], num_epochs=None))
    assert [next(it) for _ in range(20)] == ["good"] * 20


def test_a_bad_source_in_a_mixture_stops_the_batches_with_its_name(write_jsonl):
    """At 10% weight in a mixture, an all-bad source used to stall the whole pipeline."""
    good = write_jsonl("good.jsonl", [{"text": f"document number {i}"} for i in range(50)])
    bad = write_jsonl("bad.jsonl", [{"body": "wrong field"}])
    cfg = DataConfig(
        sources=[
            SourceConfig("good", "jsonl", good, weight=0.9),
            SourceConfig("bad", "jsonl", bad, weight=0.1),
        ],
        max_skipped_in_a_row=100,
    )
    it = build_train_iterator(cfg, seq_len=16, global_batch=2)
    with pytest.raises(DataError, match=r"'bad' .*missing_field=100"):
        for _ in range(100):
            next(it)
