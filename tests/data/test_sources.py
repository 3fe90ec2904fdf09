import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from frontier_jax.data import SourceConfig
from frontier_jax.data.records import INVALID_UTF8, MISSING_FIELD, Record
from frontier_jax.data.sources import resolve_paths, source_records


def _records(kind, path, text_field="text"):
    return list(source_records(SourceConfig("s", kind, path, text_field=text_field), seed=0))


def _write_array_record(path, payloads):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()
    return str(path)


def test_jsonl_reader_yields_text_field_with_file_and_line(write_jsonl):
    path = write_jsonl("a.jsonl", [{"text": "one", "id": 1}, {"body": "x", "text": "twö"}])
    assert _records("jsonl", path) == [Record(f"{path}:1", "one"), Record(f"{path}:2", "twö")]


def test_jsonl_reader_handles_a_last_line_without_newline(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"t": "a"}\n{"t": "b"}')
    assert [r.text for r in _records("jsonl", str(path), "t")] == ["a", "b"]


def test_glob_path_reads_matching_files_in_sorted_order(write_jsonl, tmp_path):
    write_jsonl("b.jsonl", [{"text": "from b"}])
    write_jsonl("a.jsonl", [{"text": "from a"}])
    assert [r.text for r in _records("jsonl", str(tmp_path / "*.jsonl"))] == ["from a", "from b"]


def test_parquet_reader_reads_column_across_row_groups(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(
        pa.table({"body": ["a", "b", None, "d", "e"], "n": [1, 2, 3, 4, 5]}), path, row_group_size=2
    )
    got = _records("parquet", path, "body")
    assert [r.text for r in got] == ["a", "b", None, "d", "e"]
    assert got[2] == Record(f"{path}#2", problem=MISSING_FIELD)


def test_parquet_without_the_text_column_is_an_error_naming_file_and_column(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(ValueError, match="no column 'text'") as err:
        _records("parquet", path)
    assert path in str(err.value)


def test_array_record_reader_reads_utf8_text_records(tmp_path):
    path = _write_array_record(tmp_path / "a.array_record", ["héllo".encode(), b"\xff\xfe", b"bye"])
    assert _records("array_record", path) == [
        Record(f"{path}#0", "héllo"),
        Record(f"{path}#1", problem=INVALID_UTF8),
        Record(f"{path}#2", "bye"),
    ]


def test_array_record_reader_reads_json_records_text_field(tmp_path):
    payloads = [json.dumps({"content": c}).encode() for c in ["x", "y"]]
    path = _write_array_record(tmp_path / "a.array_record", payloads)
    assert [r.text for r in _records("array_record", path, "content")] == ["x", "y"]


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "array_record"])
def test_empty_file_error_names_the_file(tmp_path, kind):
    path = tmp_path / f"empty.{kind}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty") as err:
        _records(kind, str(path))
    assert str(path) in str(err.value)


def test_empty_parquet_table_error_names_the_file(tmp_path):
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="is empty") as err:
        _records("parquet", path)
    assert path in str(err.value)


def test_path_matching_no_file_is_an_error_naming_source_and_pattern(tmp_path):
    pattern = str(tmp_path / "*.jsonl")
    with pytest.raises(FileNotFoundError, match="matches no file") as err:
        _records("jsonl", pattern)
    assert pattern in str(err.value) and "'s'" in str(err.value)


def test_file_that_is_not_parquet_is_an_error_naming_it(write_jsonl):
    path = write_jsonl("a.parquet", [{"text": "jsonl, named .parquet"}])
    with pytest.raises(ValueError, match="is not a Parquet file") as err:
        _records("parquet", path)
    assert path in str(err.value)


def test_sources_in_an_object_store_are_globbed_and_read_through_epath(write_jsonl, tmp_path):
    """gs:// paths go through etils epath: its backend is mapped onto tmp_path here
    (`epath.testing.mock_epath`), so the glob, the sizes, the JSONL line scan and reads and the
    Parquet reads all must use epath to find the files."""
    write_jsonl("web-0.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    write_jsonl("web-1.jsonl", [{"text": "gamma"}])
    pq.write_table(pa.table({"text": ["delta", "epsilon"]}), tmp_path / "books.parquet")
    root = "gs://bucket/corpus"
    opened = []

    def local(path):
        return str(path).replace(root, str(tmp_path))

    def mapped(fn, path, *args, **kwargs):
        opened.append(str(path))
        return fn(local(path), *args, **kwargs)

    def glob(fn, pattern):
        return [p.replace(str(tmp_path), root) for p in fn(local(pattern))]

    with epath.testing.mock_epath(open=mapped, stat=mapped, exists=mapped, isdir=mapped, glob=glob):
        web = SourceConfig("web", "jsonl", f"{root}/web-*.jsonl")
        assert resolve_paths(web) == [f"{root}/web-0.jsonl", f"{root}/web-1.jsonl"]
        assert [(r.origin, r.text) for r in source_records(web, seed=0)] == [
            (f"{root}/web-0.jsonl:1", "alpha"),
            (f"{root}/web-0.jsonl:2", "beta"),
            (f"{root}/web-1.jsonl:1", "gamma"),
        ]
        books = SourceConfig("books", "parquet", f"{root}/books.parquet")
        assert [r.text for r in source_records(books, seed=0)] == ["delta", "epsilon"]
    assert f"{root}/books.parquet" in opened
