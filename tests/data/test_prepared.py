"""Prepared shards: the same tokens as the raw pipeline, resumable preparation, corrupt / missing
shards and another tokenizer refused by name before training."""

import collections
import dataclasses
import json
import os

import numpy as np
import pytest

from frontier_jax.data import DataConfig, SourceConfig, build_train_iterator, source_documents
from frontier_jax.data import prepare as prepare_module
from frontier_jax.data.prepare import prepare, prepared_sources
from frontier_jax.data.prepared import PreparedError
from frontier_jax.data.template import render_document
from frontier_jax.data.tokenizer import byte_tokenizer

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions")


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefgh xyz\n"), size=rng.integers(5, 90))) for _ in range(n)]


def _chats(n):
    return [
        {
            "messages": [
                {"role": "user", "content": f"q{i}?"},
                {"role": "assistant", "content": f"a{i}" * (i + 1)},
            ]
        }
        for i in range(n)
    ]


@pytest.fixture
def raw_config(write_jsonl):
    """Two sources over 3-record shards: texts with bad / empty / overlong records, and chats."""
    web = _texts(20, seed=0) + ["o" * 130, ""] + _texts(5, seed=1)
    web_lines = [{"text": t} for t in web]
    web_lines.insert(3, b"{not json")
    sources = [
        SourceConfig("web", "jsonl", write_jsonl("web.jsonl", web_lines), weight=2.0),
        SourceConfig("chat", "jsonl", write_jsonl("chat.jsonl", _chats(12)), format="chat"),
    ]
    return DataConfig(sources=sources, max_document_chars=50, seed=3)


def _prepared_config(raw, out, **fields):
    return DataConfig(
        sources=prepared_sources(raw, str(out)),
        max_document_chars=raw.max_document_chars,
        seed=raw.seed,
        **fields,
    )


def _all_batches(cfg, **kwargs):
    return list(build_train_iterator(cfg, seq_len=24, global_batch=3, num_epochs=1, **kwargs))


def _documents(cfg, source):
    """The token ids and train flags of every document of one pass over `source`."""
    tok = byte_tokenizer()
    return [tuple(map(tuple, render_document(tok, d))) for d in source_documents(cfg, source, num_epochs=1)]


@pytest.mark.parametrize("mask_documents", [False, True])
def test_prepared_shards_give_the_raw_pipelines_batches_with_shuffle_off(
    raw_config, tmp_path, mask_documents
):
    prepare(raw_config, str(tmp_path / "out"), records_per_shard=3, progress=False)
    raw = dataclasses.replace(raw_config, shuffle=False, mask_documents=mask_documents)
    prepared = _prepared_config(raw_config, tmp_path / "out", shuffle=False, mask_documents=mask_documents)
    want, got = _all_batches(raw), _all_batches(prepared)
    assert len(want) > 5 and len(got) == len(want)
    for g, w in zip(got, want):
        for key in KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_shuffled_prepared_documents_are_the_raw_documents_in_a_seeded_order(raw_config, tmp_path):
    prepare(raw_config, str(tmp_path / "out"), records_per_shard=3, progress=False)
    prepared = _prepared_config(raw_config, tmp_path / "out")
    for raw_source, source in zip(raw_config.sources, prepared.sources):
        raw_docs = _documents(dataclasses.replace(raw_config, shuffle=False), raw_source)
        shuffled = _documents(prepared, source)
        assert collections.Counter(shuffled) == collections.Counter(raw_docs)
        assert shuffled != raw_docs  # a global shuffle, not the file order
        assert _documents(prepared, source) == shuffled  # deterministic from the seed
        other_seed = dataclasses.replace(prepared, seed=prepared.seed + 1)
        assert _documents(other_seed, source) != shuffled


def test_a_restored_prepared_iterator_yields_exactly_the_next_batches(raw_config, tmp_path):
    prepare(raw_config, str(tmp_path / "out"), records_per_shard=3, progress=False)
    cfg = _prepared_config(raw_config, tmp_path / "out")
    it = build_train_iterator(cfg, seq_len=24, global_batch=3)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = build_train_iterator(cfg, seq_len=24, global_batch=3)
    resumed.set_state(state)
    for g, w in zip([next(resumed) for _ in range(3)], expected):
        for key in KEYS:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_manifest_counts_the_documents_tokens_and_skips_of_each_shard(raw_config, tmp_path):
    (web, chat) = prepare(raw_config, str(tmp_path / "out"), records_per_shard=3, progress=False)
    manifest = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())
    assert manifest == web.manifest and manifest["num_shards"] == 10 and len(manifest["shards"]) == 10
    assert manifest["tokenizer"]["origin"] == "byte" and manifest["screen"]["max_document_chars"] == 50
    counts = collections.Counter()
    for shard in manifest["shards"]:
        counts.update(shard["counts"])
    assert counts["invalid_json"] == 1 and counts["empty"] == 1 and counts["split_overlong"] >= 2
    docs = _documents(dataclasses.replace(raw_config, shuffle=False), raw_config.sources[0])
    assert sum(s["documents"] for s in manifest["shards"]) == len(docs)
    assert sum(s["tokens"] for s in manifest["shards"]) == sum(len(ids) for ids, _ in docs)
    assert sum(s["documents"] for s in chat.manifest["shards"]) == 12


def test_an_interrupted_preparation_redoes_only_the_unfinished_shards(raw_config, tmp_path, monkeypatch):
    fresh = prepare(raw_config, str(tmp_path / "fresh"), records_per_shard=3, progress=False)
    screen, calls = prepare_module.screen, []

    def dies_at_record_8(record, **limits):
        calls.append(record)
        if len(calls) == 8:  # shard 2 (records 6..8) half-written
            raise KeyboardInterrupt
        return screen(record, **limits)

    monkeypatch.setattr(prepare_module, "screen", dies_at_record_8)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare(raw_config, str(out), records_per_shard=3, progress=False)
    listed = json.loads((out / "web" / "manifest.json").read_text())["shards"]
    assert [s["index"] for s in listed] == [0, 1]
    assert not (out / "web" / "shard-00002-of-00010.array_record").exists()
    with pytest.raises(PreparedError, match=r"incomplete \(2 of 10 shards written\)"):
        build_train_iterator(_prepared_config(raw_config, out), seq_len=24, global_batch=3)

    monkeypatch.setattr(prepare_module, "screen", screen)
    web, chat = prepare(raw_config, str(out), records_per_shard=3, progress=False)
    assert web.written == list(range(2, 10)) and chat.written == [0, 1, 2, 3]
    assert web.manifest == fresh[0].manifest and chat.manifest == fresh[1].manifest  # same checksums
    assert sorted(os.listdir(out / "web")) == ["manifest.json"] + [
        f"shard-{i:05d}-of-00010.array_record" for i in range(10)
    ]
    again = prepare(raw_config, str(out), records_per_shard=3, progress=False)
    assert [r.written for r in again] == [[], []]


@pytest.mark.parametrize("damage", ["flip_a_byte", "delete"])
def test_a_corrupt_or_missing_shard_is_named_before_training_and_prepare_rewrites_it(
    raw_config, tmp_path, damage
):
    out = tmp_path / "out"
    prepare(raw_config, str(out), records_per_shard=3, progress=False)
    shard = out / "web" / "shard-00004-of-00010.array_record"
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x01
        shard.write_bytes(bytes(data))
    cfg = _prepared_config(raw_config, out)
    problem = "missing" if damage == "delete" else "corrupt: checksum mismatch"
    with pytest.raises(
        PreparedError, match=f"prepared shard .*shard-00004-of-00010.array_record is {problem}"
    ):
        build_train_iterator(cfg, seq_len=24, global_batch=3)
    web, chat = prepare(raw_config, str(out), records_per_shard=3, progress=False)
    assert web.written == [4] and chat.written == []
    next(build_train_iterator(cfg, seq_len=24, global_batch=3))


def test_shards_of_another_tokenizer_or_screening_are_refused(raw_config, tmp_path):
    out = tmp_path / "out"
    prepare(raw_config, str(out), records_per_shard=3, progress=False)
    other_tokens = _prepared_config(raw_config, out, special_tokens={"fim_begin": "<|fim_prefix|>"})
    with pytest.raises(PreparedError, match=r"data.sources\[0\] .* was prepared with another tokenizer"):
        build_train_iterator(other_tokens, seq_len=24, global_batch=3)
    other_limits = DataConfig(sources=prepared_sources(raw_config, str(out)), max_document_chars=60, seed=3)
    with pytest.raises(
        PreparedError, match="data.max_document_chars=50, this config has data.max_document_chars=60"
    ):
        build_train_iterator(other_limits, seq_len=24, global_batch=3)


def test_prepare_refuses_a_directory_of_another_preparation(raw_config, tmp_path):
    out = str(tmp_path / "out")
    prepare(raw_config, out, records_per_shard=3, progress=False)
    with pytest.raises(PreparedError, match="holds a preparation with another records_per_shard"):
        prepare(raw_config, out, records_per_shard=4, progress=False)
    prepare(dataclasses.replace(raw_config, sources=[raw_config.sources[0]]), out, records_per_shard=3)
    reweighted = dataclasses.replace(raw_config.sources[0], weight=5.0)
    assert (
        prepare(dataclasses.replace(raw_config, sources=[reweighted]), out, records_per_shard=3)[0].written
        == []
    )  # the weight is the mixture's, not the shards'


@pytest.mark.slow  # two spawned processes importing grain: ~30 s on a loaded 2-core machine
def test_worker_processes_write_the_same_shards(raw_config, tmp_path):
    one = prepare(raw_config, str(tmp_path / "one"), records_per_shard=3, progress=False)
    two = prepare(raw_config, str(tmp_path / "two"), records_per_shard=3, workers=2, progress=False)
    assert [r.manifest for r in two] == [r.manifest for r in one]


@pytest.mark.parametrize(
    "source, fragment",
    [
        (SourceConfig("p", "prepared"), r"data.sources\[0\].path is not set for kind='prepared'"),
        (SourceConfig("p", "prepared", "/x", format="chat"), r"data.sources\[0\].format='chat'"),
    ],
)
def test_a_prepared_source_config_is_checked_by_name(source, fragment):
    with pytest.raises(ValueError, match=fragment):
        DataConfig(sources=[source]).validate()


def test_a_directory_without_manifest_is_named(tmp_path):
    cfg = DataConfig(sources=[SourceConfig("p", "prepared", str(tmp_path))])
    with pytest.raises(PreparedError, match="has no manifest.json: path must be a directory written by"):
        build_train_iterator(cfg, seq_len=8, global_batch=2)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"records_per_shard": 0}, "--records-per-shard 0"),
        ({"max_records": 0}, "--max-records 0"),
        ({"workers": 0}, "--workers 0"),
    ],
)
def test_bad_prepare_arguments_are_named(raw_config, tmp_path, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        prepare(raw_config, str(tmp_path), **kwargs)


def test_generated_math_needs_max_records_and_prepared_sources_are_not_prepared_again(tmp_path):
    with pytest.raises(
        ValueError, match=r"kind='embedded_math'\) generates 2\^31 records: give --max-records"
    ):
        prepare(DataConfig(sources=[SourceConfig("m", "embedded_math")]), str(tmp_path))
    (math,) = prepare(
        DataConfig(sources=[SourceConfig("m", "embedded_math")]), str(tmp_path), max_records=5, progress=False
    )
    assert math.manifest["records"] == 5
    with pytest.raises(ValueError, match=r"data.sources\[0\] \('m'\) is already prepared"):
        prepare(DataConfig(sources=[SourceConfig("m", "prepared", str(tmp_path / "m"))]), str(tmp_path / "o"))
