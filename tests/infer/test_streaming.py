"""Streaming: incremental detokenisation hands text over in pieces whose concatenation is the
finished text, never splitting a multi-byte character and never handing over the start of a stop
string that later matches; `submit(on_token=...)` streams every token of every request.

Reference: the whole output decoded at once, cut at the first occurrence of any stop string (the
engine's former way, one full decode per token)."""

import pytest

from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.infer.detokenize import INCOMPLETE, TextStream
from tests.infer import tiny

TEXT = "héllo wörld ✓ done: END of it"


def reference_text(ids: list[int], stop: tuple[str, ...]) -> tuple[str, bool]:
    """(decode(ids) cut at the first stop string, whether one was found)."""
    text = tiny.TOKENIZER.decode(ids)
    hits = [text.index(s) for s in stop if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


@pytest.mark.parametrize(
    "stop",
    [(), ("ö",), ("✓ d",), ("END", "d: E"), ("zzz", "o w")],
    ids=["none", "multibyte_stop", "stop_spanning_a_multibyte_char", "overlapping_stops", "late_and_early"],
)
def test_deltas_join_to_the_decoded_text_cut_at_the_first_stop(stop):
    ids = tiny.TOKENIZER.encode(TEXT)  # byte tokens: é, ö (2 bytes) and ✓ (3 bytes) span tokens
    stream, deltas = TextStream(tiny.TOKENIZER, stop), []
    for n, token in enumerate(ids, 1):
        delta, stopped = stream.push(token)
        deltas.append(delta)
        assert INCOMPLETE not in delta, "a multi-byte character was split"
        assert not any(s in "".join(deltas) for s in stop), "a stop string was handed over"
        if stopped:
            break
    deltas.append(stream.finish())
    expected, found = reference_text(ids[:n], stop)
    assert stopped == found == bool(stop and any(s in TEXT for s in stop))
    assert "".join(deltas) == stream.text == expected


def test_unfinished_character_at_the_end_is_flushed_as_decode_writes_it():
    ids = tiny.TOKENIZER.encode("ok ✓")[:-1]  # the check mark's last byte missing
    stream = TextStream(tiny.TOKENIZER)
    deltas = [stream.push(token)[0] for token in ids] + [stream.finish()]
    assert deltas[-2] == "" and "".join(deltas) == tiny.TOKENIZER.decode(ids) == stream.text


def test_on_token_streams_each_token_and_text_equal_to_the_completion():
    model = tiny.model()
    prompts = tiny.prompts([5, 9, 3])
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    reference = Engine(model, tokenizer=tiny.TOKENIZER, infer=tiny.INFER).generate(prompts, params)
    # a stop string of two printable ASCII tokens from the middle of request 0's reference text
    out = reference[0].output_ids
    k = next(k for k in range(4, len(out) - 1) if all(32 < t < 127 for t in out[k : k + 2]))
    stop = tiny.TOKENIZER.decode(out[k : k + 2])
    params[0] = SamplingParams(max_new_tokens=24, temperature=1.0, seed=1, ignore_eos=True, stop=(stop,))
    events = {}
    engine = Engine(model, tokenizer=tiny.TOKENIZER, infer=tiny.INFER)
    ids = [
        engine.submit(p, sp, on_token=lambda e: events.setdefault(e.request_id, []).append(e))
        for p, sp in zip(prompts, params)
    ]
    while not engine.scheduler.idle:
        engine.step()
    for request_id, sp in zip(ids, params):
        completion, streamed = engine.result(request_id), events[request_id]
        assert [e.token for e in streamed] == completion.output_ids
        assert [e.logprob for e in streamed] == completion.logprobs
        assert [e.finish_reason for e in streamed] == [None] * (len(streamed) - 1) + [
            completion.finish_reason
        ]
        assert "".join(e.text for e in streamed) == completion.text
        assert (completion.text, completion.finish_reason == "stop") == reference_text(
            completion.output_ids, sp.stop
        )
    first = engine.result(ids[0])
    assert first.finish_reason == "stop" and first.output_ids == out[: len(first.output_ids)]
    assert len(first.output_ids) <= k + 2 and stop not in first.text
