import random
import re

import numpy as np
import pytest
import tokenizers

from frontier_jax.data import (
    DataConfig,
    SourceConfig,
    build_train_iterator,
    byte_tokenizer,
)
from frontier_jax.data.template import Piece, chat_pieces, render

TOK = byte_tokenizer()
ALPHABET = "abc xyz\n日é"


def _chats(n, seed):
    rng = random.Random(seed)

    def words():
        return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 12)))

    chats = []
    for _ in range(n):
        turns = [{"role": "system", "content": words()}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            turns += [{"role": "user", "content": words()}, {"role": "assistant", "content": words()}]
        chats.append({"messages": turns})
    return chats


def _segments(batch):
    """(decoded inputs + last target, decoded trained targets) of every document in a batch."""
    for r in range(len(batch["input_ids"])):
        seg, ids, tgt, mask = (batch[k][r] for k in ("segment_ids", "input_ids", "targets", "loss_mask"))
        for s in set(seg[seg > 0].tolist()):
            where = seg == s
            whole = TOK.decode([*ids[where], tgt[where][-1]])
            yield whole, TOK.decode(tgt[where & (mask > 0)].tolist())


def test_chat_loss_mask_covers_exactly_the_assistant_turns(write_jsonl):
    path = write_jsonl("chat.jsonl", _chats(30, seed=0))
    cfg = DataConfig(sources=[SourceConfig("chat", "jsonl", path, format="chat")], mask_documents=True)
    it = build_train_iterator(cfg, seq_len=128, global_batch=4)
    documents = [d for _ in range(3) for d in _segments(next(it))]
    assert len(documents) > 10
    for whole, trained in documents:
        assert whole.startswith("<bos>") and whole.endswith("<|end|><eos>")
        answers = re.findall(r"<\|assistant\|>(.*?)<\|end\|>", whole, flags=re.DOTALL)
        assert answers and trained == "".join(a + "<|end|>" for a in answers)


def test_prompt_response_record_trains_on_the_response_and_its_end_only(write_jsonl):
    rows = [{"q": f"question {i}?", "a": f"answer {i}."} for i in range(8)]
    path = write_jsonl("qa.jsonl", rows)
    cfg = DataConfig(
        sources=[
            SourceConfig("qa", "jsonl", path, format="prompt_response", prompt_field="q", response_field="a")
        ],
        mask_documents=True,
        shuffle=False,
    )
    whole, trained = next(_segments(next(build_train_iterator(cfg, seq_len=64, global_batch=1))))
    assert whole == "<bos><|user|>question 0?<|end|><|assistant|>answer 0.<|end|><eos>"
    assert trained == "answer 0.<|end|>"


def test_special_strings_inside_chat_content_stay_text():
    ids, train = render(TOK, chat_pieces([("user", "<|end|><|assistant|>"), ("assistant", "<eos>")]))
    specials = [i for i in ids.tolist() if i >= 256]
    assert specials == [TOK.bos_id, 260, 262, 261, 262, TOK.eos_id]
    assert TOK.decode(ids[train].tolist()) == "<eos><|end|>"


def test_render_concatenates_pieces_with_their_training_flags():
    pieces = [Piece(special="fim_begin", train=False), Piece("ab"), Piece(special="fim_end")]
    ids, train = render(TOK, pieces)
    np.testing.assert_array_equal(ids, [263, 97, 98, 265])
    np.testing.assert_array_equal(train, [False, True, True, True])


def test_chat_source_needs_the_role_tokens_of_the_tokenizer(write_jsonl, tmp_path):
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]")
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl("chat.jsonl", _chats(2, seed=0))
    cfg = DataConfig(
        sources=[SourceConfig("chat", "jsonl", path, format="chat")],
        tokenizer=str(tmp_path / "tokenizer.json"),
    )
    with pytest.raises(ValueError, match="no 'system' special token"):
        build_train_iterator(cfg, seq_len=16, global_batch=1)
