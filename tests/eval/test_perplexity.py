"""Perplexity, CE and bits per byte equal a float64 numpy computation from each window's own
full-sequence logits (the model run on that window alone, batch 1, no packing), over documents
one of which is longer than the context, and a chat; and the figures are the same on several
8-device layouts.

The reference renders each document by hand, walks the windows with its own loop (b = 0, S, 2S,
...; it scores the pairs the previous window did not reach) and sums log-softmax in float64.
Bits per byte is lm-eval's own aggregation (`lm_eval.api.metrics.bits_per_byte`) of each
document's (log-likelihood of its text tokens, UTF-8 bytes of its text), as its
`loglikelihood_rolling` tasks report it: the <eos> and <|end|> targets are in the CE, not in the
bits per byte.  Tolerance: the jitted scorer's per-token log-probabilities are fp32 (relative
1e-6 on sums of ~100 terms)."""

import math

import jax
import numpy as np
import pytest
from lm_eval.api.metrics import bits_per_byte

from frontier_jax.config import load_config
from frontier_jax.data.tokenizer import byte_tokenizer
from frontier_jax.eval.perplexity import evaluate_documents
from frontier_jax.eval.scorer import Scorer
from frontier_jax.runtime.program import build_model_program

from .common import DOCUMENTS, TINY_MODEL

CONTEXT = 16
CHAT = (("user", "2 + 2?"), ("assistant", "4, ok"))  # scored: the answer and its <|end|>


def _program(*mesh):
    cfg = load_config("model/toy", TINY_MODEL + list(mesh))
    return build_model_program(cfg, jax.devices()[:1] if not mesh else None)


def _rendered_by_hand():
    """(ids, scored targets, text targets, text) per document: the pair i -> i + 1 is scored
    when ids[i + 1] is in `scored`; text marks the targets that are text, not special tokens."""
    tok = byte_tokenizer()
    bos, eos, end = tok.special_id("bos"), tok.special_id("eos"), tok.special_id("end")
    out = []
    for text in DOCUMENTS:
        body = tok.encode(text)
        out.append(([bos, *body, eos], [True] * (len(body) + 1), [True] * len(body) + [False], text))
    prompt, answer = tok.encode(CHAT[0][1]), tok.encode(CHAT[1][1])
    head = [bos, tok.special_id("user"), *prompt, end, tok.special_id("assistant")]
    ids = head + answer + [end, eos]
    scored = [False] * (len(head) - 1) + [True] * (len(answer) + 1) + [False]
    text = [False] * (len(head) - 1) + [True] * len(answer) + [False, False]
    return out + [(ids, scored, text, CHAT[1][1])]


def _reference(program, params, biases, stride):
    """(nll of the scored targets, their count, [(log-likelihood of the text targets, text
    bytes)] per document) from float64 log-softmax of each window's logits."""
    model = program.model(params, biases)
    nll, tokens, per_document = 0.0, 0, []
    for ids, scored, text, raw in _rendered_by_hand():
        text_ll = 0.0
        n, done, begin = len(ids) - 1, 0, 0
        while done < n:
            end = min(begin + CONTEXT, n)
            logits = np.asarray(model(np.asarray([ids[begin:end]], np.int32))[0], np.float64)
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            for pair in range(done, end):
                lp = logp[pair - begin, ids[pair + 1]]
                nll -= lp if scored[pair] else 0.0
                tokens += scored[pair]
                text_ll += lp if text[pair] else 0.0
            done, begin = end, begin + stride
        per_document.append((text_ll, len(raw.encode("utf-8"))))
    return nll, tokens, per_document


@pytest.mark.parametrize("stride,batch_size", [(CONTEXT, 2), (5, 3)])
def test_figures_equal_float64_reference_from_full_sequence_logits(stride, batch_size):
    program = _program()
    params, biases = program.init(3)
    nll, tokens, per_document = _reference(program, params, biases, stride)
    assert max(len(d) for d in DOCUMENTS) + 1 > CONTEXT  # a document longer than the context
    scorer = Scorer(program, params, biases, context=CONTEXT, batch_size=batch_size, progress=False)
    got = evaluate_documents(scorer, byte_tokenizer(), DOCUMENTS + [CHAT], stride=stride)
    assert got["tokens"] == tokens == sum(len(d.encode()) + 1 for d in DOCUMENTS) + len(CHAT[1][1]) + 1
    assert got["bytes"] == sum(n for _, n in per_document)
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-6)
    np.testing.assert_allclose(got["ce"], nll / tokens, rtol=1e-6)
    np.testing.assert_allclose(got["perplexity"], math.exp(nll / tokens), rtol=1e-6)
    np.testing.assert_allclose(got["bits_per_byte"], bits_per_byte(per_document), rtol=1e-6)
    np.testing.assert_allclose(got["text_nll"], -sum(ll for ll, _ in per_document), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        ("mesh.data=8",),
        ("mesh.data=2", "mesh.expert=2", "mesh.tensor=2"),
        ("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
    ],
)
def test_figures_same_on_8_device_layouts_as_on_one_device(layout):
    single = _program()
    params, biases = single.init(5)
    want = evaluate_documents(
        Scorer(single, params, biases, context=CONTEXT, batch_size=8, progress=False),
        byte_tokenizer(),
        DOCUMENTS,
        stride=7,
    )
    program = _program(*layout)
    shard_p, shard_b = program.shardings()
    got = evaluate_documents(
        Scorer(
            program,
            jax.device_put(params, shard_p),
            jax.device_put(biases, shard_b),
            context=CONTEXT,
            batch_size=8,
            progress=False,
        ),
        byte_tokenizer(),
        DOCUMENTS,
        stride=7,
    )
    assert (got["tokens"], got["bytes"], got["windows"]) == (want["tokens"], want["bytes"], want["windows"])
    np.testing.assert_allclose(got["nll"], want["nll"], rtol=1e-6)
    np.testing.assert_allclose(got["bits_per_byte"], want["bits_per_byte"], rtol=1e-6)


def test_batch_not_divisible_by_the_batch_split_is_an_error():
    program = _program("mesh.data=8")
    params, biases = program.init(0)
    with pytest.raises(ValueError, match="eval.batch_size=4 is not divisible by the 8-way"):
        Scorer(program, params, biases, context=CONTEXT, batch_size=4)
