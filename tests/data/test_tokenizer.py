import pickle

import pytest
import tokenizers

from frontier_jax.data import byte_tokenizer, load_tokenizer

TEXTS = ["", "hello world", "naïve café — 日本語 🎉\n\ttabs  and  spaces ", "<bos> and <eos> in text", "\x00\x7f"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips_any_text_and_ids_are_utf8_bytes(text):
    tok = byte_tokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_has_259_ids_with_specials_after_the_bytes():
    tok = byte_tokenizer()
    assert tok.vocab_size == 259
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
    assert tok.decode([tok.bos_id, 104, 105, tok.eos_id]) == "<bos>hi<eos>"


def test_tokenizer_still_encodes_special_names_as_text_after_pickling():
    tok = pickle.loads(pickle.dumps(byte_tokenizer()))
    assert tok.encode("<eos>") == list(b"<eos>")
    assert tok.eos_id == 258


def _write_word_level_tokenizer(path, specials):
    vocab = {word: i for i, word in enumerate([*specials, "[UNK]", "hello", "world"])}
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
