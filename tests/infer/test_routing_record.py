"""Records for post-training (`SamplingParams.record_routing`, `tempered_logprobs`): the experts
the engine routed each token to, replayed in the training forward (`Transformer.forward(
routed_experts=...)`), are the experts the float64 reference model selects at every input
position (prompt + completion without its last token), and leave the training forward's logits
unchanged; the tempered log-probs are log softmax(z / T) of the training forward; a prompt served
from the prefix cache has the routing of a cold prefill; forked samples share the prompt's.

Tolerances (fp32): replayed vs plain training forward atol 1e-6 (the same computation when the
experts are the ones it selects); engine log-probs (absorbed decode over the paged cache) vs the
training forward atol 2e-5 on O(5) values.  The reference's selections are compared exactly: fp32
and float64 pick the same experts unless two biased scores tie within ~1e-6, which these fixed
seeds do not reach."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.infer import Engine, SamplingParams
from frontier_jax.model import Transformer
from tests.infer import tiny
from tests.infer.test_speculative import SPECULATIVE
from tests.model import common
from tests.model import reference as ref

RECORD = SamplingParams(
    max_new_tokens=7, temperature=0.7, seed=5, record_routing=True, tempered_logprobs=True
)


@pytest.fixture(scope="module")
def model():
    return tiny.model()


def reference_selection(model, inputs: list[int]) -> np.ndarray:
    """The experts the float64 reference model selects for each of `inputs` in each MoE layer
    [len(inputs), L_moe, K]."""
    want = ref.transformer(common.params_f64(model), np.asarray([inputs]), model.cfg)
    return np.stack([s["experts"][0] for s in want["moe_stats"]], axis=1).astype(np.int32)


def trainer_inputs(c) -> list[int]:
    """A trainer's input_ids of a completion: prompt + completion but its last token."""
    return c.prompt_ids + c.output_ids[:-1]


@common.jit
def training_logits(model, ids, routed_experts):
    plain = model.forward(ids, with_mtp=False).logits
    return plain, model.forward(ids, with_mtp=False, routed_experts=routed_experts).logits


def test_recorded_routing_is_the_reference_selection_and_replays_to_the_same_logits(model):
    cfg = model.cfg
    prompts = tiny.prompts([13, 5], seed=4)  # 13: three prefill chunks of 6, one full block
    completions = Engine(model, infer=tiny.INFER).generate(prompts, RECORD)
    # both sequences in one training batch, right-padded (causal: padding changes no earlier position)
    width = max(len(trainer_inputs(c)) for c in completions)
    ids = np.zeros((len(completions), width), np.int32)
    replay = np.zeros((len(completions), width, cfg.num_moe_layers, cfg.num_experts_per_tok), np.int32)
    for b, c in enumerate(completions):
        inputs = trainer_inputs(c)
        assert c.routed_experts.shape == (len(inputs), cfg.num_moe_layers, cfg.num_experts_per_tok)
        assert c.routed_experts.dtype == np.int32
        np.testing.assert_array_equal(c.routed_experts, reference_selection(model, inputs))
        ids[b, : len(inputs)], replay[b, : len(inputs)] = inputs, c.routed_experts
    plain, replayed = training_logits(model, jnp.asarray(ids), jnp.asarray(replay))
    for b, c in enumerate(completions):
        n = len(trainer_inputs(c))
        common.assert_close(replayed[b, :n], plain[b, :n], rtol=0, atol=1e-6)
        generated = np.asarray(
            plain[b, len(c.prompt_ids) - 1 : n]
        )  # the logits each output token was drawn from
        tokens = np.asarray(c.output_ids)[:, None]
        raw = np.take_along_axis(jax.nn.log_softmax(generated, -1), tokens, -1)[:, 0]
        tempered = np.take_along_axis(jax.nn.log_softmax(generated / RECORD.temperature, -1), tokens, -1)[
            :, 0
        ]
        np.testing.assert_allclose(c.logprobs, raw, atol=2e-5)
        np.testing.assert_allclose(c.tempered_logprobs, tempered, atol=2e-5)
        assert np.abs(tempered - raw).max() > 0.05  # T = 0.7 is not the raw distribution


def test_a_prompt_from_the_prefix_cache_has_the_routing_of_a_cold_prefill(model):
    base = tiny.prompts([20], seed=6)[0]
    later = base[:16] + tiny.prompts([5], seed=7)[0]  # shares 2 full blocks of 8
    greedy = SamplingParams(max_new_tokens=4, record_routing=True)
    engine = Engine(model, infer=tiny.INFER)
    (first,) = engine.generate([base], dataclasses.replace(greedy, record_routing=False))
    # blocks keyed without routing are not served to a recording request: a cold prefill
    (cold,) = engine.generate([base], greedy)
    assert first.routed_experts is None and cold.cached_tokens == 0
    # the recording request's blocks took the keys over, with their routing
    (hit,) = engine.generate([later], greedy)
    assert hit.cached_tokens == 16
    np.testing.assert_array_equal(hit.routed_experts[:16], cold.routed_experts[:16])
    for c in (cold, hit):
        np.testing.assert_array_equal(c.routed_experts, reference_selection(model, trainer_inputs(c)))


def test_forked_samples_share_the_prompts_routing(model):
    """Also when the leader is cancelled mid-prefill: its heir keeps the routing of the full
    prompt block it takes over and prefills the rest."""
    prompt = tiny.prompts([13], seed=2)[0]
    params = SamplingParams(max_new_tokens=5, temperature=1.0, seed=40, record_routing=True, n=2)
    engine = Engine(model, infer=tiny.INFER)
    forked = engine.generate([prompt], params)
    assert forked[0].output_ids != forked[1].output_ids  # the samples differ after the prompt
    np.testing.assert_array_equal(
        forked[0].routed_experts[: len(prompt)], forked[1].routed_experts[: len(prompt)]
    )
    other = tiny.prompts([13], seed=3)[0]
    first = engine.submit(other, dataclasses.replace(params, n=3))
    engine.step(), engine.step()  # the leader prefilled positions 0 .. 11
    assert engine.cancel(first)  # sample 1 takes over from position 8 (after the full block)
    while not engine.scheduler.idle:
        engine.step()
    heirs = [engine.result(first + j) for j in (1, 2)]
    for c in forked + heirs:
        np.testing.assert_array_equal(c.routed_experts, reference_selection(model, trainer_inputs(c)))


def test_records_the_engine_cannot_keep_are_refused_in_one_line(model):
    for name in ("record_routing", "tempered_logprobs"):
        with pytest.raises(ValueError, match=f"^{name}=1 must be true or false$"):
            SamplingParams(**{name: 1}).check()
    dense_cfg = common.tiny_config(
        vocab_size=tiny.TOKENIZER.vocab_size, num_layers=1, first_k_dense=1, mtp_depth=0
    )
    dense = common.build(lambda: Transformer(dense_cfg, rngs=nnx.Rngs(0)))
    for engine, params, message in (
        (Engine(model, infer=SPECULATIVE), RECORD, "record_routing=true with infer.speculative=mtp"),
        (
            Engine(model, infer=SPECULATIVE),
            SamplingParams(tempered_logprobs=True),
            "tempered_logprobs=true with infer.speculative=mtp",
        ),
        (Engine(dense, infer=tiny.INFER), RECORD, "record_routing=true: this model has no MoE layers"),
    ):
        (done,) = engine.generate([[1, 2, 3]], params)  # ended at submission: nothing runs
        assert done.finish_reason == "error" and message in done.error and "\n" not in done.error
