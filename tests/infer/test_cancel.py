"""Engine.cancel: a running or waiting request ends at once ("cancelled"), its slot and cache
blocks are freed, and the other requests' outputs equal those of a run without it."""

import numpy as np
import pytest

from frontier_jax.infer import Engine, SamplingParams
from tests.infer import tiny

LENGTHS = (7, 11, 4, 9, 5, 6)  # 4 decode slots: the last two wait
PARAMS = [
    SamplingParams(max_new_tokens=12),
    SamplingParams(max_new_tokens=14, temperature=0.9, seed=4),
    SamplingParams(max_new_tokens=10, temperature=0.7, seed=9),
    SamplingParams(max_new_tokens=8),
    SamplingParams(max_new_tokens=6, temperature=1.0, seed=2),
    SamplingParams(max_new_tokens=8),
]
CANCELLED = (1, 5)  # 1 while decoding, 5 while waiting for a slot


def test_cancelled_requests_free_their_blocks_and_leave_the_others_unchanged():
    model = tiny.model()
    prompts = tiny.prompts(LENGTHS, seed=1)
    kept = [i for i in range(len(LENGTHS)) if i not in CANCELLED]
    alone = Engine(model, infer=tiny.INFER).generate([prompts[i] for i in kept], [PARAMS[i] for i in kept])
    full = Engine(model, infer=tiny.INFER).generate(prompts[1:2], PARAMS[1:2])[0]

    engine, events = Engine(model, infer=tiny.INFER), []
    ids = [engine.submit(p, sp, on_token=events.append) for p, sp in zip(prompts, PARAMS)]
    for _ in range(4):  # 0 .. 3 decode (a step of theirs in flight), 4 and 5 wait
        engine.step()
    assert [r.id for r in engine.scheduler.running] == ids[:4] and engine._in_flight is not None
    assert engine.result(ids[1]) is None and len(engine.scheduler.running[1].output_ids) > 1
    free = engine.scheduler.alloc.free_blocks
    held = len(engine.scheduler.alloc.blocks(ids[1]))
    assert engine.cancel(ids[1]) and engine.cancel(ids[5])
    assert engine.scheduler.alloc.free_blocks == free + held
    assert [r.id for r in engine.scheduler.running] == [ids[0], ids[2], ids[3]]
    assert [r.id for r in engine.scheduler.waiting] == [ids[4]]
    while not engine.scheduler.idle:
        engine.step()

    cancelled, never_run = engine.result(ids[1]), engine.result(ids[5])
    assert cancelled.finish_reason == never_run.finish_reason == "cancelled"
    assert 0 < len(cancelled.output_ids) < len(full.output_ids)
    assert cancelled.output_ids == full.output_ids[: len(cancelled.output_ids)]
    assert never_run.output_ids == []
    for i, expected in zip(kept, alone):
        got = engine.result(ids[i])
        assert got.output_ids == expected.output_ids and got.finish_reason == "length"
        np.testing.assert_allclose(got.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)
    ends = [e for e in events if e.finish_reason == "cancelled"]
    assert [(e.request_id, e.token) for e in ends] == [(ids[1], None), (ids[5], None)]
    assert [e.token for e in events if e.request_id == ids[1]][:-1] == cancelled.output_ids
    assert engine.scheduler.alloc.free_blocks == engine.layout.num_blocks - 1
    assert not engine.cancel(ids[0])  # finished already
    with pytest.raises(ValueError, match="cancel: no request 6 was submitted"):
        engine.cancel(6)
