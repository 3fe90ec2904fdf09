import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from frontier_jax.data import DataConfig, DataStats, SourceConfig, source_documents
from frontier_jax.data.records import EMPTY_CONTENT, MISSING_FIELD, NO_ASSISTANT, WRONG_TYPE, Record
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
    {"messages": []},  # line 8: no turn at all: no assistant turn
    {"messages": GOOD[::-1]},
    {"messages": GOOD[:1]},  # line 10: no assistant turn
    {"messages": [GOOD[0], {"role": "assistant", "content": " \n"}]},  # line 11: blank content
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
        NO_ASSISTANT,
        None,
        NO_ASSISTANT,
        EMPTY_CONTENT,
    ]
    assert [r.detail for r in got if r.problem] == [
        "messages",
        "messages is not a list",
        "messages[0] is not an object",
        "messages[0].role='robot' (roles: system, user, assistant)",
        "messages[0].content is not a string",
        "messages[0].content",
        "messages has no assistant turn",
        "messages has no assistant turn",
        "messages[1].content",
    ]


def test_bad_chat_records_are_skipped_counted_and_logged_with_file_and_line(write_jsonl, caplog):
    path = write_jsonl("chat.jsonl", BAD_CHAT_LINES)
    cfg = DataConfig(sources=[SourceConfig("chat", "jsonl", path, format="chat")], shuffle=False)
    it = iter(source_documents(cfg, cfg.sources[0], num_epochs=1))
    with caplog.at_level(logging.WARNING, logger="frontier_jax.data.screen"):
        docs = list(it)
    assert docs == [(("user", "hi"), ("assistant", "hello")), (("assistant", "hello"), ("user", "hi"))]
    counts = DataStats.from_state(it.get_state()).counts["chat"]
    assert (
        counts["documents"],
        counts["missing_field"],
        counts["wrong_type"],
        counts["no_assistant_turn"],
        counts["empty_content"],
    ) == (2, 2, 4, 2, 1)
    messages = [r.getMessage() for r in caplog.records]
    assert f"'chat': skipped {path}:2 (missing_field: messages)" in messages[0]
    assert f"{path}:3 (wrong_type: messages is not a list)" in messages[1]
    assert f"{path}:5 (wrong_type: messages[0].role='robot' (roles: system, user, assistant))" in messages[3]


def test_prompt_response_records_with_a_missing_or_non_text_field_are_rejected(write_jsonl):
    path = write_jsonl(
        "qa.jsonl",
        [
            {"prompt": "p", "response": "r"},
            {"prompt": "p"},
            {"prompt": "p", "response": 1},
            {"prompt": "p", "response": ""},
        ],
    )
    got = list(source_records(SourceConfig("qa", "jsonl", path, format="prompt_response"), seed=0))
    assert got[0].messages == (("user", "p"), ("assistant", "r"))
    assert [r.problem for r in got] == [None, MISSING_FIELD, WRONG_TYPE, EMPTY_CONTENT]
    assert [r.detail for r in got] == [None, "response", "response is not a string", "response"]


def test_parquet_chat_column_of_structs_is_read_as_messages(tmp_path):
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"turns": [GOOD, [{"role": "user", "content": "q"}]]}), path)
    got = list(
        source_records(SourceConfig("c", "parquet", path, format="chat", messages_field="turns"), seed=0)
    )
    assert [r.messages for r in got] == [(("user", "hi"), ("assistant", "hello")), None]
    assert (got[1].problem, got[1].detail) == (NO_ASSISTANT, "turns has no assistant turn")


def test_parquet_without_the_messages_column_is_an_error_naming_file_and_column(tmp_path):
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.table({"text": ["a"]}), path)
    with pytest.raises(ValueError, match="no column 'messages'") as err:
        source_records(SourceConfig("c", "parquet", path, format="chat"), seed=0)
    assert path in str(err.value)


def test_embedded_source_with_a_structured_format_is_rejected_by_name():
    with pytest.raises(ValueError, match=r"data.sources\[0\].format='chat'"):
        DataConfig(sources=[SourceConfig("m", "embedded_math", format="chat")]).validate()
