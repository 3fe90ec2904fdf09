"""Fill-in-the-middle (frontier_jax/data/fim.py): exact layouts, invertibility, the applied
rates against binomial bounds, specials only from the transform, and the pipeline with FIM
(per-source rate, plain documents unchanged, exact resume, bad rates named)."""

import math
import pathlib
import random

import grain
import numpy as np
import pytest
import tokenizers

from frontier_jax import cli
from frontier_jax.data import (
    DataConfig,
    SourceConfig,
    build_train_iterator,
    byte_tokenizer,
    restore_iterator_state,
    save_iterator_state,
)
from frontier_jax.data.fim import FimLayout, FimTransform, fim_documents, fim_pieces
from frontier_jax.data.prepare import prepare
from frontier_jax.data.template import render

TOK = byte_tokenizer()
BOS, EOS, BEGIN, HOLE, END = 257, 258, 263, 264, 265  # the byte tokenizer's ids (test_tokenizer.py)
ALPHABET = "ab <|fim_begin|> xy\n日é"
REPO = pathlib.Path(__file__).parents[2]


def _random_texts(n, seed, max_len=40):
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, max_len))) for _ in range(n)]


def _transformed(texts, *, rate, spm_share, seed=0):
    """The documents out of fim_documents over `texts`, in order."""
    docs = grain.MapDataset.source(texts).to_iter_dataset(grain.ReadOptions(num_threads=0))
    return list(fim_documents(docs, rate=rate, spm_share=spm_share, seed=seed))


def _reconstruct(ids):
    """The document of a rendered FIM example, read back from its token ids alone.

    PSM  bos B prefix H suffix E middle eos  ->  prefix + middle + suffix
    SPM  bos B H suffix E prefix middle eos  ->  (the empty prefix) + (prefix middle) + suffix
    """
    ids = list(ids)
    assert ids[:2] == [BOS, BEGIN] and ids[-1] == EOS
    assert [i for i in ids if i >= 256] == [BOS, BEGIN, HOLE, END, EOS]
    hole, end = ids.index(HOLE), ids.index(END)
    return TOK.decode(ids[2:hole]) + TOK.decode(ids[end + 1 : -1]) + TOK.decode(ids[hole + 1 : end])


@pytest.mark.parametrize(
    "layout, expected",
    [
        (FimLayout.psm, [BOS, BEGIN, *b"ab", HOLE, *b"ef", END, *b"cd", EOS]),
        (FimLayout.spm, [BOS, BEGIN, HOLE, *b"ef", END, *b"ab", *b"cd", EOS]),
    ],
)
def test_psm_and_spm_layouts_are_exact_and_trained_after_bos(layout, expected):
    ids, train = render(TOK, fim_pieces("ab", "cd", "ef", layout))
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(train, [False] + [True] * (len(expected) - 1))


def test_transform_splits_at_two_sorted_character_offsets_drawn_from_the_generator():
    text = "0123456789"
    rng = np.random.default_rng(3)
    pieces = FimTransform(rate=1.0, spm_share=0.0).random_map(text, rng)
    replay = np.random.default_rng(3)
    assert replay.random() < 1.0  # the rate draw
    i, j = sorted(replay.integers(0, len(text) + 1, size=2))
    assert pieces == fim_pieces(text[:i], text[i:j], text[j:], FimLayout.psm)


def _layout(pieces):
    """SPM when the hole marker follows the begin marker directly (in PSM a prefix piece does)."""
    return FimLayout.spm if pieces[2].special == "fim_hole" else FimLayout.psm


@pytest.mark.parametrize(
    "spm_share, layouts",
    [(0.0, {FimLayout.psm}), (0.5, {FimLayout.psm, FimLayout.spm}), (1.0, {FimLayout.spm})],
)
def test_every_fim_example_reconstructs_its_document_from_the_token_ids(spm_share, layouts):
    texts = _random_texts(300, seed=1)
    out = _transformed(texts, rate=1.0, spm_share=spm_share)
    for text, pieces in zip(texts, out, strict=True):
        ids, _ = render(TOK, pieces)
        assert _reconstruct(ids) == text
    assert {_layout(pieces) for pieces in out} == layouts


def test_special_strings_in_a_document_stay_text_inside_a_fim_example():
    text = "x<|fim_begin|>y<|fim_hole|>z<|fim_end|><eos>"
    (pieces,) = _transformed([text], rate=1.0, spm_share=0.0)
    ids, _ = render(TOK, pieces)
    assert [i for i in ids if i >= 256] == [BOS, BEGIN, HOLE, END, EOS]  # _reconstruct checks it too
    assert _reconstruct(ids) == text


def _within_binomial_bound(count, n, p, sigmas=5.0):
    """|count - n p| <= sigmas * sqrt(n p (1 - p)): fails by chance with probability < 6e-7."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_applied_rate_spm_share_and_split_offsets_match_their_distributions():
    n, rate, spm_share, length = 40_000, 0.1, 0.3, 100
    texts = [f"{k:0{length}d}" for k in range(n)]
    out = _transformed(texts, rate=rate, spm_share=spm_share, seed=7)
    fim = [doc for doc in out if isinstance(doc, list)]
    assert all(doc == text for doc, text in zip(out, texts) if isinstance(doc, str))
    assert _within_binomial_bound(len(fim), n, rate), len(fim)  # 4000 +- 300
    spm = [doc for doc in fim if _layout(doc) == FimLayout.spm]
    assert _within_binomial_bound(len(spm), len(fim), spm_share), len(spm)  # 1200 +- 145
    # Middle length |i - j| of two uniform offsets on {0..L}: mean L(L+2)/(3(L+1)) = 33.66,
    # sd ~ L/sqrt(18) = 23.6, so the mean over ~4000 examples is within 5 sigma = 1.9 of it.
    middles = [len(doc[-2].text) for doc in fim]
    expected = length * (length + 2) / (3 * (length + 1))
    assert abs(np.mean(middles) - expected) <= 5 * (length / math.sqrt(18)) / math.sqrt(len(fim))


def test_rate_zero_leaves_the_dataset_itself_and_rate_one_transforms_all():
    docs = grain.MapDataset.source(["abc"]).to_iter_dataset()
    assert fim_documents(docs, rate=0.0, spm_share=0.5, seed=0) is docs
    assert all(isinstance(d, list) for d in _transformed(_random_texts(50, 2), rate=1.0, spm_share=0.5))


def test_draws_are_deterministic_per_seed():
    texts = _random_texts(200, seed=3)
    first = _transformed(texts, rate=0.5, spm_share=0.5, seed=11)
    assert first == _transformed(texts, rate=0.5, spm_share=0.5, seed=11)
    assert first != _transformed(texts, rate=0.5, spm_share=0.5, seed=12)


# ------------------------------------------------------------------ the pipeline with FIM


def _segments(batch):
    """(input_ids, targets, loss_mask, positions) of every document segment of a batch."""
    for r in range(len(batch["input_ids"])):
        seg = batch["segment_ids"][r]
        for s in sorted(set(seg[seg > 0].tolist())):
            where = seg == s
            yield tuple(
                batch[k][r][where].tolist() for k in ("input_ids", "targets", "loss_mask", "positions")
            )


def test_fim_rate_is_per_source_and_plain_documents_pack_as_before(write_jsonl):
    """Source "fim" at rate 1, "plain" at rate 0, one document per segment (SFT packing): every
    "fim" document is a FIM example trained after <bos>; every "plain" one is <bos> text <eos>
    with its usual loss mask and positions."""
    fim_texts, plain_texts = _random_texts(30, seed=4, max_len=20), _random_texts(30, seed=5, max_len=20)
    cfg = DataConfig(
        sources=[
            SourceConfig(
                "fim", "jsonl", write_jsonl("f.jsonl", [{"text": t} for t in fim_texts]), fim_rate=1.0
            ),
            SourceConfig("plain", "jsonl", write_jsonl("p.jsonl", [{"text": t} for t in plain_texts])),
        ],
        mask_documents=True,
        shuffle=False,
    )
    it = build_train_iterator(cfg, seq_len=64, global_batch=4, num_epochs=1)
    seen = {"fim": set(), "plain": set()}
    for batch in it:
        for inputs, targets, mask, positions in _segments(batch):
            ids = inputs + targets[-1:]
            assert positions == list(range(len(inputs))) and inputs[1:] == targets[:-1]
            assert mask == [1] * len(inputs)
            if ids[1] == BEGIN:
                seen["fim"].add(_reconstruct(ids))
            else:
                text = TOK.decode(ids[1:-1])
                assert ids == [BOS, *text.encode(), EOS]
                seen["plain"].add(text)
    assert seen["fim"] <= set(fim_texts) and seen["plain"] <= set(plain_texts)
    assert len(seen["fim"]) > 10 and len(seen["plain"]) > 10


@pytest.mark.parametrize("taken", [0, 1, 6], ids=["fresh", "after_1_batch", "after_6_batches"])
@pytest.mark.parametrize("mask_documents", [False, True])
def test_pipeline_with_fim_resumes_exactly(mask_documents, taken, tmp_path):
    sources = [
        SourceConfig("code", "embedded_code", weight=0.7, fim_rate=0.5, fim_spm_share=0.5),
        SourceConfig("math", "embedded_math", weight=0.3, fim_rate=0.2),
    ]
    cfg = DataConfig(sources=sources, mask_documents=mask_documents, max_document_chars=200)
    it = build_train_iterator(cfg, seq_len=48, global_batch=4)
    _ = [next(it) for _ in range(taken)]
    save_iterator_state(it, tmp_path / "data.json")
    expected = [next(it) for _ in range(4)]
    assert sum(int((b["input_ids"] == BEGIN).sum()) for b in expected) > 0  # FIM examples in view
    resumed = build_train_iterator(cfg, seq_len=48, global_batch=4)
    restore_iterator_state(resumed, tmp_path / "data.json")
    for got, want in zip([next(resumed) for _ in range(4)], expected):
        assert sorted(got) == sorted(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_fim_with_a_tokenizer_json_without_the_fim_tokens_names_the_missing_token(write_jsonl, tmp_path):
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"[UNK]": 0, "<s>": 1, "</s>": 2}, unk_token="[UNK]")
    )
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_jsonl("t.jsonl", [{"text": "hello"}])
    cfg = DataConfig(
        sources=[SourceConfig("t", "jsonl", path, fim_rate=0.1)], tokenizer=str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match=r"no 'fim_begin' special token.*data.special_tokens.fim_begin"):
        build_train_iterator(cfg, seq_len=16, global_batch=1)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"fim_rate": 1.5}, "data.sources[0].fim_rate=1.5"),
        ({"fim_rate": -0.1}, "data.sources[0].fim_rate=-0.1"),
        ({"fim_rate": float("nan")}, "data.sources[0].fim_rate=nan"),
        ({"fim_rate": 0.1, "fim_spm_share": 2.0}, "data.sources[0].fim_spm_share=2.0"),
        (
            {"fim_rate": 0.1, "format": "chat", "kind": "jsonl", "path": "c.jsonl"},
            "fim_rate=0.1 with format='chat'",
        ),
        ({"fim_rate": 0.1, "kind": "prepared", "path": "out/s"}, "fim_rate=0.1 with kind='prepared'"),
    ],
)
def test_bad_fim_settings_are_rejected_naming_the_field(fields, named):
    cfg = DataConfig(sources=[SourceConfig(**{"name": "s", "kind": "embedded_code", **fields})])
    with pytest.raises(ValueError) as err:
        cfg.validate()
    assert named in str(err.value)


def test_prepare_refuses_a_source_with_fim_since_shards_hold_tokens(tmp_path):
    cfg = DataConfig(sources=[SourceConfig("code", "embedded_code", fim_rate=0.1)])
    with pytest.raises(
        ValueError, match=r"data.sources\[0\].fim_rate=0.1 \('code'\).*prepare with fim_rate=0"
    ):
        prepare(cfg, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_fim_rate_outside_0_1_through_the_cli_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "fim.yaml"
    path.write_text(
        f"include: [{REPO / 'configs' / 'model' / 'toy.yaml'}]\n"
        "data:\n  sources:\n    - {name: code, kind: embedded_code, fim_rate: 1.5}\n"
    )
    assert cli.main(["describe", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.sources[0].fim_rate=1.5" in err and err.count("\n") == 1
