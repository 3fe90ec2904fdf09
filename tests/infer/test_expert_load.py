"""Engine.expert_load: the tokens each MoE layer routed to each expert, counted on the device.
Prefill-only loads equal the training forward's loads on the same tokens; decoding counts each
token fed back exactly once, never padding nor the row of a request that a stop token ended while
the next decode step was already in flight."""

import numpy as np

from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.runtime.expert_ledger import ExpertsConfig
from tests.infer import tiny
from tests.model import common

LENGTHS = (13, 5, 9, 6)  # chunks of 6: padded positions and rows in the prefill steps
WINDOW = 3  # engine steps in the ledger's window


def test_prefill_expert_loads_equal_the_training_forwards():
    model = tiny.model()
    prompts = tiny.prompts(LENGTHS, seed=5)
    engine = Engine(model, infer=tiny.INFER)
    engine.generate(prompts, SamplingParams(max_new_tokens=1))  # prefill, then one sampled token
    got = engine.expert_load()
    loads = common.jit(lambda m, ids: m.forward(ids, with_mtp=False).moe_stats.load)
    expected = sum(np.asarray(loads(model, np.asarray([p], np.int32)), np.float64) for p in prompts)
    assert got.tokens == sum(LENGTHS)
    assert got.load.shape == (model.cfg.num_moe_layers, model.cfg.n_routed_experts)
    np.testing.assert_array_equal(got.load, expected)


def test_decode_counts_each_fed_back_token_once():
    model = tiny.model()
    prompts = tiny.prompts(LENGTHS, seed=6)
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(len(prompts))]
    reference = Engine(model, infer=tiny.INFER).generate(prompts, params)
    # stop tokens hit mid-run: async decoding has the stopped row in the next step already
    params = [
        SamplingParams(max_new_tokens=12, temperature=1.0, seed=s, stop_token_ids=(c.output_ids[5],))
        for s, c in enumerate(reference)
    ]
    engine = Engine(model, infer=tiny.INFER, experts=ExpertsConfig(window_steps=WINDOW))
    totals = _totals_after_each_step(engine)
    completions = engine.generate(prompts, params)
    assert any(c.finish_reason == "stop" for c in completions)
    # the ledger's window: the last WINDOW steps' counts, the total's growth over them
    window = engine.expert_ledger.window()
    assert window.tokens == totals[-1].tokens - totals[-1 - WINDOW].tokens
    assert 0 < window.tokens < totals[-1].tokens  # steps before the window were counted
    np.testing.assert_array_equal(window.load, totals[-1].load - totals[-1 - WINDOW].load)
    got = engine.expert_load(reset=True)
    fed_back = sum(len(c.output_ids) - 1 for c in completions)  # every token but the last
    assert got.tokens == sum(LENGTHS) + fed_back
    np.testing.assert_array_equal(got.load.sum(1), model.cfg.num_experts_per_tok * got.tokens)
    after = engine.expert_load()
    assert after.tokens == 0 and not after.load.any()
    assert engine.expert_ledger.window().tokens == 0


def _totals_after_each_step(engine: Engine) -> list:
    """The engine's expert-load totals, read after each of its steps from now on."""
    totals, step = [], engine.step

    def counted_step():
        finished = step()
        totals.append(engine.expert_load())
        return finished

    engine.step = counted_step
    return totals
