import hashlib
import json
import pathlib
import pickle
import re

import pytest
import tokenizers
from omegaconf import OmegaConf

from frontier_jax.data import byte_tokenizer, load_tokenizer
from frontier_jax.data.tokenizer import SPECIAL_TOKENS, check_tokenizer, tokenizer_identity

TEXTS = [
    "",
    "hello world",
    "naïve café — 日本語 🎉\n\ttabs  and  spaces ",
    "<bos> and <eos> in text",
    "\x00\x7f",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text_and_ids_are_utf8_bytes(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_has_266_ids_with_named_specials_after_the_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 266
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id]) == "<bos>hi<eos>"
    assert [tok.special_id(name) for name in SPECIAL_TOKENS] == list(range(256, 266))
    assert [tok.decode([tok.special_id(name)]) for name in SPECIAL_TOKENS] == [
        "<pad>",
        "<bos>",
        "<eos>",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
        "<|fim_begin|>",
        "<|fim_hole|>",
        "<|fim_end|>",
    ]


def test_toy_model_vocabulary_holds_every_byte_tokenizer_id():
    toy = OmegaConf.load(pathlib.Path(__file__).parents[2] / "configs" / "model" / "toy.yaml")
    assert toy.model.vocab_size >= byte_tokenizer().vocab_size


SPECIAL_TEXT = "x <|fim_begin|>a<|fim_hole|>b<|fim_end|> <|user|>hi<|end|><|assistant|><eos><bos><pad>"


def test_special_token_strings_in_text_are_encoded_as_plain_bytes():
    tok = byte_tokenizer()
    ids = tok.encode(SPECIAL_TEXT)
    assert ids == list(SPECIAL_TEXT.encode("utf-8"))
    assert max(ids) < 256 and tok.decode(ids) == SPECIAL_TEXT


def test_special_ids_follow_renamed_strings_of_data_special_tokens():
    tok = byte_tokenizer({"fim_begin": "<PRE>"})
    assert tok.decode([tok.special_id("fim_begin")]) == "<PRE>"
    assert tok.encode("<PRE>") == list(b"<PRE>")
    with pytest.raises(ValueError, match="data.special_tokens.fim_start is not a special token name"):
        byte_tokenizer({"fim_start": "<PRE>"})


def test_tokenizer_still_encodes_special_names_as_text_after_pickling():
    tok = pickle.loads(pickle.dumps(byte_tokenizer()))
    assert tok.encode("<eos>") == list(b"<eos>")
    assert tok.eos_id == 258


def _write_word_level_tokenizer(path, specials, words=()):
    vocab = {word: i for i, word in enumerate([*specials, "[UNK]", "hello", "world", *words])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))


def test_tokenizer_json_file_loads_with_bos_eos_and_pad(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, ["<s>", "</s>", "<pad>"])
    tok = load_tokenizer(str(path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 6
    assert tok.encode("hello world") == [4, 5]
    assert tok.encode("</s>") != [1]  # special names in text stay text


def test_tokenizer_json_without_pad_pads_with_eos(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, ["<|endoftext|>"])
    tok = load_tokenizer(str(path))
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0


def test_tokenizer_json_without_eos_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, ["<s>"])
    with pytest.raises(ValueError, match="no eos token") as err:
        load_tokenizer(str(path))
    assert str(path) in str(err.value)


def test_missing_tokenizer_file_error_names_path_and_config_field(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.json")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(missing)
    assert missing in str(err.value) and "data.tokenizer" in str(err.value)


DEEPSEEK_SPECIALS = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁hole｜>",
    "<｜fim▁end｜>",
]


def test_tokenizer_json_specials_are_found_by_name_among_added_tokens(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, DEEPSEEK_SPECIALS, words=["<|system|>"])  # a plain word
    tok = load_tokenizer(str(path))
    by_name = {name: tok.decode([tok.special_id(name)]) for name in tok.special_ids}
    assert by_name == {
        "bos": "<｜begin▁of▁sentence｜>",
        "eos": "<｜end▁of▁sentence｜>",
        "pad": "<｜end▁of▁sentence｜>",
        "user": "<｜User｜>",
        "assistant": "<｜Assistant｜>",
        "fim_begin": "<｜fim▁begin｜>",
        "fim_hole": "<｜fim▁hole｜>",
        "fim_end": "<｜fim▁end｜>",
    }
    with pytest.raises(ValueError, match="no 'system' special token") as err:  # a vocab word is not one
        tok.special_id("system")
    assert str(path) in str(err.value) and "data.special_tokens.system" in str(err.value)


def test_tokenizer_json_never_yields_a_special_id_from_text(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, ["<s>", "</s>", "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"])
    tok = load_tokenizer(str(path))
    specials = set(tok.special_ids.values())
    assert not specials & set(tok.encode("hello <|fim_begin|> world <|fim_hole|><|fim_end|> </s>"))
    assert tok.special_id("fim_begin") == 2


def test_data_special_tokens_names_the_token_of_a_tokenizer_json(tmp_path):
    path = tmp_path / "tokenizer.json"
    _write_word_level_tokenizer(path, ["<s>", "</s>", "<PRE>"])
    assert load_tokenizer(str(path), {"fim_begin": "<PRE>"}).special_id("fim_begin") == 2


@pytest.mark.parametrize("content", ["not json at all", '{"version": "1.0"}'])
def test_invalid_tokenizer_json_is_a_value_error_naming_the_file(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not a valid Hugging Face tokenizer.json") as err:
        load_tokenizer(str(path))
    assert str(path) in str(err.value)


def test_tokenizer_identity_is_of_its_content_not_its_path_or_formatting(tmp_path):
    """The byte tokenizer and its JSON written to a file (re-indented, another path) are the same
    tokenizer; one more added token, or another special token named, is another."""
    byte = byte_tokenizer()
    path = tmp_path / "elsewhere" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(json.loads(byte.to_str()), indent=4))
    same, want = tokenizer_identity(load_tokenizer(str(path))), tokenizer_identity(byte)
    assert {k: v for k, v in same.items() if k != "origin"} == {
        k: v for k, v in want.items() if k != "origin"
    }
    assert want["sha256"] == hashlib.sha256(byte.to_str().encode()).hexdigest() and want["vocab_size"] == 266
    check_tokenizer(want, load_tokenizer(str(path)), "run", "fix it")  # passes

    grown = json.loads(byte.to_str())
    grown["added_tokens"].append({**grown["added_tokens"][-1], "id": 266, "content": "<|new|>"})
    path.write_text(json.dumps(grown))
    changed = tokenizer_identity(load_tokenizer(str(path)))
    assert changed["sha256"] != want["sha256"] and changed["vocab_size"] == 267
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"run was trained with another tokenizer (data.tokenizer='byte', 266 ids, sha256 "
            f"{want['sha256'][:12]}...) than this config's data.tokenizer='{path}' (267 ids, sha256 "
            f"{changed['sha256'][:12]}...; data.special_tokens count): fix it"
        ),
    ):
        check_tokenizer(want, load_tokenizer(str(path)), "run was trained", "fix it")
    with pytest.raises(ValueError, match="another tokenizer"):
        check_tokenizer(want, byte_tokenizer({"fim_begin": "<|fim_prefix|>"}), "run was trained", "fix it")


def test_a_run_recorded_without_a_tokenizer_is_a_warning_not_a_refusal(caplog):
    check_tokenizer(None, byte_tokenizer(), "checkpoint 4 in /run was trained", "unused")
    assert [r.getMessage() for r in caplog.records] == [
        "checkpoint 4 in /run was trained before tokenizers were recorded: data.tokenizer='byte' is "
        "not checked against the one it used"
    ]
