import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frontier_jax.data import DataConfig, DataStats, SourceConfig, source_documents
from frontier_jax.data.records import MISSING_FIELD, WRONG_TYPE, Record
from frontier_jax.data.sources import source_records

GOOD = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
BAD_CHAT_LINES = [
    {"messages": GOOD},
    {"other": GOOD},  # line 2: missing field
    {"messages": "hi"},  # line 3: not a list
    {"messages": ["hi"]},  # line 4: a message that is not an object
    {"messages": [{"role": "robot", "content": "x"}]},  # line 5: unknown role
    {"messages": [{"role": "user", "content": 7}]},  # line 6: content not text
    {"messages": [{"role": "user"}]},  # line 7: message without content
    {"messages": []},  # line 8: no turn at all: empty
    {"messages": GOOD[::-1]},
]


def test_chat_records_read_roles_and_contents_or_say_what_is_wrong(write_jsonl):
    path = write_jsonl("chat.jsonl", BAD_CHAT_LINES)
    got = list(source_records(SourceConfig("c", "jsonl", path, format="chat"), seed=0))
    assert got[0] == Record(f"{path}:1", messages=(("user", "hi"), ("assistant", "hello")))
    assert [r.problem for r in got] == [
        None,
        MISSING_FIELD,
        WRONG_TYPE,
        WRONG_TYPE,
        WRONG_TYPE,
        WRONG_TYPE,
        MISSING_FIELD,
        None,
        None,
    ]


def test_bad_chat_records_are_skipped_counted_and_logged_with_file_and_line(write_jsonl, caplog):
    path = write_jsonl("chat.jsonl", BAD_CHAT_LINES)
    cfg = DataConfig(sources=[SourceConfig("chat", "jsonl", path, format="chat")], shuffle=False)
    it = iter(source_documents(cfg, cfg.sources[0], num_epochs=1))
    with caplog.at_level(logging.WARNING, logger="frontier_jax.data.screen"):
        docs = list(it)
    assert docs == [(("user", "hi"), ("assistant", "hello")), (("assistant", "hello"), ("user", "hi"))]
    counts = DataStats.from_state(it.get_state()).counts["chat"]
    assert (counts["documents"], counts["missing_field"], counts["wrong_type"], counts["empty"]) == (
        2,
        2,
        4,
        1,
    )
    messages = [r.getMessage() for r in caplog.records]
    assert f"'chat': skipped {path}:2 (missing_field)" in messages[0]
    assert f"{path}:3 (wrong_type)" in messages[1]


def test_prompt_response_records_with_a_missing_or_non_text_field_are_rejected(write_jsonl):
    path = write_jsonl(
        "qa.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "p"}, {"prompt": "p", "response": 1}]
    )
    got = list(source_records(SourceConfig("qa", "jsonl", path, format="prompt_response"), seed=0))
    assert got[0].messages == (("user", "p"), ("assistant", "r"))
    assert [r.problem for r in got] == [None, MISSING_FIELD, WRONG_TYPE]


def test_parquet_chat_column_of_structs_is_read_as_messages(tmp_path):
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"turns": [GOOD, [{"role": "user", "content": "q"}]]}), path)
    got = list(
        source_records(SourceConfig("c", "parquet", path, format="chat", messages_field="turns"), seed=0)
    )
    assert [r.messages for r in got] == [(("user", "hi"), ("assistant", "hello")), (("user", "q"),)]


def test_parquet_without_the_messages_column_is_an_error_naming_file_and_column(tmp_path):
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ValueError, match="no column 'messages'") as err:
        source_records(SourceConfig("c", "parquet", path, format="chat"), seed=0)
    assert path in str(err.value)


def test_embedded_source_with_a_structured_format_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"data.sources\[0\].format='chat'"):
        DataConfig(sources=[SourceConfig("m", "embedded_math", format="chat")]).validate()
