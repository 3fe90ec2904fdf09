"""Per-token log-probabilities of targets (frontier_jax/model/logprobs.py, runtime/logprobs.py):
vocabulary-chunked values, argmax and gradients against float64 numpy, the program's jitted
forward on a mesh that splits the vocabulary against the float64 reference model, and no
[tokens, vocab] array anywhere in the forward + gradient at a 32K vocabulary."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from frontier_jax.model.logprobs import chunked_target_logprobs, target_logprobs
from frontier_jax.model.routing import ExpertBias
from frontier_jax.parallel.config import MeshConfig
from frontier_jax.precision.config import PrecisionConfig
from frontier_jax.runtime.logprobs import logprob_step, sequence_logprobs
from frontier_jax.runtime.program import ModelSections, build_model_program, model_program
from tests.model import common
from tests.model import reference as ref


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("chunk", [7, 25, 64], ids=["padded-chunks", "even-chunks", "one-chunk"])
def test_chunked_logprobs_and_gradients_equal_float64(chunk):
    """V = 50 in strided chunks of <= 7 (8 chunks, the last columns padding), 25 (2) or 64 (1).
    fp32 vs float64: values atol 2e-6 on O(5) log-probabilities, gradients atol 2e-5."""
    rng = np.random.default_rng(0)
    n, d, v = 13, 8, 50
    g, w = rng.standard_normal((n, d)), rng.standard_normal((d, v))
    y = rng.integers(0, v, n)
    c, e = rng.standard_normal(n), rng.standard_normal(n)  # cotangents of logp and lse

    def f(g, w):
        logp, lse, _ = chunked_target_logprobs(g, w, jnp.asarray(y), chunk=chunk)
        return jnp.sum(c * logp + e * lse), (logp, lse)

    (_, (logp, lse)), (dg, dw) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)
    )
    z = g @ w
    want = _log_softmax(z)
    np.testing.assert_allclose(logp, want[np.arange(n), y], atol=2e-6)
    np.testing.assert_allclose(lse, (z - want)[:, 0], atol=2e-6)
    _, _, argmax = chunked_target_logprobs(
        jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y)
    )
    np.testing.assert_array_equal(argmax, z.argmax(-1))
    # d/dz [c log p_y + e lse] = c (onehot_y - p) + e p
    p = np.exp(want)
    dz = c[:, None] * (np.eye(v)[y] - p) + e[:, None] * p
    np.testing.assert_allclose(dg, dz @ w.T, atol=2e-5)
    np.testing.assert_allclose(dw, g.T @ dz, atol=2e-5)


def test_argmax_takes_the_first_of_tied_columns_across_chunks():
    w = np.zeros((1, 10), np.float32)
    w[0, [3, 6]] = 1.0  # columns 3 and 6 tie; strided chunks of 4: 6 is in chunk 2, 3 in chunk 3
    _, _, argmax = chunked_target_logprobs(jnp.ones((1, 1)), jnp.asarray(w), jnp.zeros(1, jnp.int32), chunk=4)
    assert int(argmax[0]) == 3


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr and its sub-jaxprs (scan bodies, custom VJPs, pjit) produce."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _shapes(inner)
    return out


def test_no_tokens_by_vocabulary_array_in_the_forward_and_gradient():
    """A model with V = 32768 scoring B x T = 2 x 64 tokens: no value of the jaxpr of log p(targets)
    and its gradient w.r.t. every parameter holds T V elements or more (the logits would be
    [2, 64, 32768]; chunks of 8192 columns are [128, 8192]); the full-logits path does."""
    cfg = common.tiny_config(vocab_size=32768, mtp_depth=0)
    program = model_program(ModelSections(cfg, MeshConfig(data=1), PrecisionConfig()))
    params = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(program.abstract_params)
    )
    biases = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), nnx.to_pure_dict(program.abstract_biases)
    )
    b, t = 2, 64
    batch = {
        k: jax.ShapeDtypeStruct((b, t), jnp.int32)
        for k in ("input_ids", "targets", "positions", "segment_ids")
    }
    tokens_by_vocab = b * t * cfg.vocab_size

    def chunked(params, batch):
        return sequence_logprobs(program.model(params, biases), batch)[0].sum()

    def full(params, batch):
        logits = program.model(params, biases).forward(batch["input_ids"], with_mtp=False).logits
        return target_logprobs(logits, batch["targets"])[0].sum()

    for fn, materialised in ((chunked, False), (full, True)):
        shapes = _shapes(jax.make_jaxpr(jax.value_and_grad(fn))(params, batch).jaxpr)
        big = [s for s in shapes if int(np.prod(s)) >= tokens_by_vocab]
        assert bool(big) == materialised, (fn.__name__, big)


def test_program_logprobs_on_a_vocabulary_split_mesh_equal_the_float64_model():
    """logprob_step on 8 devices (data 2 x expert 2 x tensor 2: the head's vocabulary split in
    two, chunks of 16 columns) against log_softmax of the float64 reference model's logits:
    atol 1e-4 (the logits' tolerance), greedy flags exactly where the reference's margin is clear."""
    cfg = common.tiny_config(mtp_depth=0)
    sections = ModelSections(cfg, MeshConfig(data=2, expert=2, tensor=2), PrecisionConfig())
    program = build_model_program(sections)
    host = common.randomize(nnx.eval_shape(lambda: program.build(nnx.Rngs(0))), seed=6)
    _, params, biases = nnx.split(host, nnx.Param, ExpertBias)
    params, biases = nnx.to_pure_dict(params), nnx.to_pure_dict(biases)
    param_shardings, bias_shardings = program.shardings()
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (4, 8)).astype(np.int32)
    targets = np.roll(ids, -1, axis=1)
    seg = np.array([[1] * 8, [1] * 5 + [2] * 3, [1] * 6 + [0] * 2, [1] * 8], np.int32)
    pos = np.array(
        [list(range(8)), list(range(5)) + list(range(3)), list(range(8)), list(range(8))], np.int32
    )
    batch = {"input_ids": ids, "targets": targets, "positions": pos, "segment_ids": seg}
    logprob, greedy = logprob_step(program, vocab_chunk=16)(
        jax.device_put(params, param_shardings), jax.device_put(biases, bias_shardings), batch
    )
    logits = ref.transformer(common.params_f64(host), ids, cfg, pos, seg)["logits"]
    want = np.take_along_axis(_log_softmax(logits), targets[..., None], -1)[..., 0]
    real = seg != 0
    np.testing.assert_allclose(np.asarray(logprob)[real], want[real], atol=1e-4)
    top2 = np.sort(logits, -1)[..., -2:]
    clear = real & (top2[..., 1] - top2[..., 0] > 1e-3)
    np.testing.assert_array_equal(np.asarray(greedy)[clear], (logits.argmax(-1) == targets)[clear])


def test_a_scalar_head_program_refuses_what_needs_logits_in_one_line():
    """What an `Engine`, the scorer and log-probabilities call before building on a program."""
    cfg = common.tiny_config(head="scalar", mtp_depth=0)
    program = build_model_program(ModelSections(cfg, MeshConfig(data=8), PrecisionConfig()))
    for call, what in (
        (lambda: program.require_lm_head("an inference Engine"), "an inference Engine"),
        (lambda: logprob_step(program), "per-token log-probabilities"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert "\n" not in str(err.value)
        assert str(err.value).startswith(f"{what} needs a language model (model.head=lm)")
        assert "model.head=scalar" in str(err.value)


def test_replayed_logprobs_and_gradients_on_expert2_data4_equal_one_device():
    """sequence_logprobs with batch["routed_experts"] (routing replay of random distinct experts)
    and the gradient of sum(w * logprob) w.r.t. every parameter: the program on 8 devices (data 4 x
    expert 2: the experts split over `expert` with all-to-all dispatch of the replayed ids) against
    the one-device program with local experts, whose log-probs equal the float64 reference model
    replaying the same experts (atol 1e-4, the logits' tolerance).  fp32: log-probs atol 1e-5;
    gradients |g - g_1| <= 1e-5 max|g_1| per leaf (sums over the batch split 8 ways in another
    order: 2.6e-6 seen), the router's nonzero."""
    cfg = common.tiny_config(mtp_depth=0)
    rng = np.random.default_rng(3)
    b, t, k = 8, 8, cfg.num_experts_per_tok
    ids = rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[1, 5:], seg[2, 6:] = 2, 0
    replay = np.stack(
        [rng.permutation(cfg.n_routed_experts)[:k] for _ in range(b * t * cfg.num_moe_layers)]
    ).reshape(b, t, cfg.num_moe_layers, k)
    batch = {
        "input_ids": ids,
        "targets": np.roll(ids, -1, axis=1),
        "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
        "segment_ids": seg,
        "routed_experts": replay.astype(np.int32),
    }
    weights = rng.standard_normal((b, t)).astype(np.float32) * (seg != 0)

    single = model_program(ModelSections(cfg, MeshConfig(data=1), PrecisionConfig()))
    host = common.randomize(nnx.eval_shape(lambda: single.build(nnx.Rngs(0))), seed=2)
    _, host_params, host_biases = nnx.split(host, nnx.Param, ExpertBias)

    def run(program):
        params, biases = nnx.to_pure_dict(host_params), nnx.to_pure_dict(host_biases)
        if program.mesh is not None:
            param_shardings, bias_shardings = program.shardings()
            params, biases = jax.device_put(params, param_shardings), jax.device_put(biases, bias_shardings)

        @jax.jit
        def fn(params, biases, batch):
            def loss(p):
                with program.sharding_context():
                    logprob, _ = sequence_logprobs(program.model(p, biases), batch, vocab_chunk=16)
                return (logprob * weights).sum(), logprob

            (_, logprob), grads = jax.value_and_grad(loss, has_aux=True)(params)
            return logprob, grads

        return jax.device_get(fn(params, biases, batch))

    one = run(single)
    logits = ref.transformer(common.params_f64(host), ids, cfg, batch["positions"], seg, replay)["logits"]
    want = np.take_along_axis(_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(one[0][seg != 0], want[seg != 0], atol=1e-4)
    eight = build_model_program(ModelSections(cfg, MeshConfig(data=4, expert=2), PrecisionConfig()))
    assert eight.mesh.shape["expert"] == 2 and eight.experts.__class__.__name__ != "LocalExperts"
    got = run(eight)
    np.testing.assert_allclose(got[0], one[0], atol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got[1]), jax.tree.leaves(one[1])):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        error = float(np.abs(g - w).max() / np.abs(w).max())
        assert error <= 1e-5, (jax.tree_util.keystr(path), error)
    assert np.abs(one[1]["moe_layers"]["blocks"]["ffn"]["router"]["kernel"]).max() > 0
