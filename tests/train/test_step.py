"""The pure train step (frontier_jax/train/step.py): gradient accumulation, the loss terms,
the auxiliary-loss-free bias update and non-finite steps.

Runs on one device with a hand-built state (random weights drawn in numpy: compiling the
model's initialiser costs as much as a train step) and a hand-built packed batch with
document masking and very uneven token counts per row, so that normalising a micro-batch by
its own counts instead of the global batch's would show.

Tolerances (fp32; different micro-batch splits sum in a different order):
  losses / grad norm      rtol 1e-5 (observed <= 3e-7)
  updated parameters      atol 1e-5 (0.3% of Adam's first step ~lr * sign(g), lr = 3e-3) plus
                          lr |g_M - g_1| / eps: the first update -lr g / (|g| + eps) is
                          Lipschitz in g with constant lr / eps, so an element whose gradient is
                          near zero (|g| << eps = 1e-8) turns the gradient's rounding noise into
                          a large update difference (observed: 2.3e-4 at |g| = 1e-10); the
                          gradients g = mu / (1 - b1) themselves are checked by the moments
  AdamW moments           rtol 1e-4 + atol 1e-5 x the leaf's largest value (observed:
                          elements ~1e-3 x smaller than the largest differ by ~1e-9)
  biases                  exact (loads are integer counts)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from frontier_jax.model.routing import route
from frontier_jax.train.objectives.pretrain import BATCH_KEYS, Pretrain
from frontier_jax.train.state import TrainState
from frontier_jax.train.step import Trainer
from tests.model import reference as ref
from tests.model.common import params_f64

from .common import run_lock, tiny_config

LOSS_RTOL = 1e-5


def make_state(trainer: Trainer, seed: int) -> TrainState:
    """A train state with random weights (norm scales around 1, kernels ~ N(0, 0.05^2)) and
    small random expert biases; AdamW state from the optimizer's own init."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            return (1.0 + 0.1 * rng.standard_normal(shape.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(shape.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(trainer.abstract_params))
    biases = jax.tree.map(
        lambda s: (0.01 * rng.standard_normal(s.shape)).astype(np.float32),
        nnx.to_pure_dict(trainer.abstract_biases),
    )
    params, biases = jax.tree.map(jnp.asarray, (params, biases))
    opt_state = jax.jit(trainer.optimizer.init)(params)
    return TrainState(
        params=params,
        biases=biases,
        opt_state=opt_state,
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def make_batch(seed: int, rows: int = 8, seq: int = 32, vocab: int = 259) -> dict:
    """Packed rows (mask_documents=True layout): documents with their own segment ids and
    positions, padded tails; rows hold 32, 32, 24, 24, 12, 8, 6, 3 real tokens."""
    rng = np.random.default_rng(seed)
    real_per_row = [32, 32, 24, 24, 12, 8, 6, 3][:rows]
    out = {k: np.zeros((rows, seq), np.int32) for k in BATCH_KEYS}
    for r, real in enumerate(real_per_row):
        j, doc = 0, 1
        while j < real:
            n = min(int(rng.integers(2, 14)), real - j)
            tokens = rng.integers(0, vocab, n + 1)
            out["input_ids"][r, j : j + n] = tokens[:-1]
            out["targets"][r, j : j + n] = tokens[1:]
            out["segment_ids"][r, j : j + n] = doc
            out["positions"][r, j : j + n] = np.arange(n)
            out["loss_mask"][r, j : j + n] = 1
            j, doc = j + n, doc + 1
    return out


def _cfg(*extra):
    return tiny_config("data.mask_documents=true", "train.warmup_steps=0", *extra)


@pytest.fixture(scope="module")
def setup():
    trainer = Trainer(_cfg())
    state = make_state(trainer, seed=0)
    batch = {k: jnp.asarray(v) for k, v in make_batch(seed=1).items()}
    forward = jax.jit(
        lambda p, b, batch: trainer.model(p, b).forward(
            batch["input_ids"], batch["positions"], batch["segment_ids"]
        )
    )
    return trainer, state, batch, forward


@pytest.fixture(scope="module")
def step_m1(setup, shared_dir):
    """The jitted train step of the M=1 trainer (compiled once per run, see `run_lock`)."""
    trainer, state, batch, _ = setup
    fn = jax.jit(trainer.train_step)
    with run_lock(shared_dir, "step_compile_m1"):
        jax.block_until_ready(fn(state, batch))
    return fn


@pytest.fixture(scope="module")
def stepped(setup, step_m1, shared_dir):
    """stepped(M) -> (new_state, metrics) of one step of the same state and global batch with M
    micro-batches (each M compiled once, when first asked for)."""
    _, state, batch, _ = setup
    results = {1: jax.device_get(step_m1(state, batch))}

    def run(m: int):
        if m not in results:
            trainer = Trainer(_cfg(f"train.micro_batches={m}"))
            with run_lock(shared_dir, f"step_compile_m{m}"):
                results[m] = jax.device_get(jax.jit(trainer.train_step)(state, batch))
        return results[m]

    return run


# ------------------------------------------------------------ accumulation
@pytest.mark.parametrize("m", [2, pytest.param(4, marks=pytest.mark.slow)])  # M=2 stays in the fast suite
def test_gradient_accumulation_matches_one_large_batch(setup, stepped, m):
    (s1, m1), (sm, mm) = stepped(1), stepped(m)
    assert mm["tokens"] == m1["tokens"] == sum([32, 32, 24, 24, 12, 8, 6, 3])
    for key in ("loss", "ce_loss", "mtp_loss", "z_loss", "balance_loss", "grad_norm", "perplexity"):
        np.testing.assert_allclose(mm[key], m1[key], rtol=LOSS_RTOL, err_msg=key)
    assert mm["finite"] == m1["finite"] == 1
    train = setup[0].cfg.train
    grads_m, grads_1 = (
        jax.tree.map(lambda mu: mu / (1 - train.b1), optax.tree_utils.tree_get(s.opt_state, "mu"))
        for s in (sm, s1)
    )
    for (path, a), b, g_m, g_1 in zip(
        jax.tree_util.tree_leaves_with_path(sm.params),
        jax.tree.leaves(s1.params),
        jax.tree.leaves(grads_m),
        jax.tree.leaves(grads_1),
    ):
        bound = 1e-5 + float(m1["lr"]) * np.abs(g_m - g_1) / train.eps
        assert np.all(np.abs(a - b) <= bound), (jax.tree_util.keystr(path), float(np.abs(a - b).max()))
    # (and they did move: lr is at its peak from step 0)
    assert all(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(jax.device_get(setup[1].params)))
    )
    for a, b in zip(jax.tree.leaves(sm.opt_state), jax.tree.leaves(s1.opt_state)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    # loads are counts of real tokens: the bias update is identical
    for a, b in zip(jax.tree.leaves(sm.biases), jax.tree.leaves(s1.biases)):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- loss terms
def _document_spans(segment_row) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of equal non-zero segment ids of one row."""
    spans, start = [], None
    for t, seg in enumerate(list(segment_row) + [0]):
        if start is not None and seg != segment_row[start]:
            spans.append((start, t))
            start = None
        if start is None and seg != 0:
            start = t
    return spans


def _ce64(logits, target) -> float:
    z = np.asarray(logits, np.float64)
    top = z.max()
    return float(top + np.log(np.exp(z - top).sum()) - z[target])


def test_loss_terms_match_numpy_from_a_forward_pass(shared_dir):
    """MTP depth 2, 2 micro-batches, rows 5..7 without tokens (as rows past the batch-size ramp,
    which the data iterator fills with padding, or empty rows).  From the forward pass's logits,
    float64 numpy: ce_loss and z_loss over the loss-masked tokens; mtp_loss = (1/D) sum_k (sum
    of depth-k CE / number of depth-k targets), the depth-k targets listed from the documents
    (position i of a document predicts the token k + 1 ahead while it is in the document);
    balance_loss = sum over the MoE and MTP layers of the float64 reference model's per-row
    L_bal over the 5 rows with real tokens, divided by 5 (not by the 8 rows of the batch).
    loss = CE + lambda MTP + alpha Bal + z Lz.  rtol 1e-5."""
    trainer = Trainer(_cfg("model.mtp_depth=2", "train.micro_batches=2"))
    cfg, depth, rows = trainer.cfg.train, 2, 5
    state = make_state(trainer, seed=0)
    host = make_batch(seed=1)
    for key in BATCH_KEYS:
        host[key][rows:] = 0
    batch = {k: jnp.asarray(v) for k, v in host.items()}
    with run_lock(shared_dir, "step_compile_mtp2_ramp"):
        _, metrics = jax.device_get(jax.jit(trainer.train_step)(state, batch))
    assert metrics["batch_rows"] == rows
    model = trainer.model(state.params, state.biases)
    out = jax.device_get(
        jax.jit(lambda m, b: m.forward(b["input_ids"], b["positions"], b["segment_ids"]))(model, batch)
    )

    mask = host["loss_mask"][:rows].astype(np.float64)
    logits = np.asarray(out.logits[:rows], np.float64)
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, host["targets"][:rows, :, None], -1)[..., 0]
    np.testing.assert_allclose(metrics["ce_loss"], (ce * mask).sum() / mask.sum(), rtol=LOSS_RTOL)
    np.testing.assert_allclose(metrics["z_loss"], (lse**2 * mask).sum() / mask.sum(), rtol=LOSS_RTOL)
    assert metrics["tokens"] == mask.sum() == 32 + 32 + 24 + 24 + 12

    per_depth = []
    for k in range(1, depth + 1):
        losses = [
            _ce64(out.mtp_logits[k - 1, r, i], host["targets"][r, i + k])
            for r in range(rows)
            for start, end in _document_spans(host["segment_ids"][r])
            for i in range(start, end - k)
        ]
        per_depth.append(np.mean(losses))
    np.testing.assert_allclose(metrics["mtp_loss"], np.mean(per_depth), rtol=LOSS_RTOL)

    want = ref.transformer(
        params_f64(model), host["input_ids"], trainer.cfg.model, host["positions"], host["segment_ids"]
    )
    balance = sum(st["balance_loss"] for st in want["moe_stats"] + want["mtp_stats"]) / rows
    np.testing.assert_allclose(metrics["balance_loss"], balance, rtol=LOSS_RTOL)
    total = (
        metrics["ce_loss"]
        + cfg.mtp_lambda * metrics["mtp_loss"]
        + cfg.balance_alpha * balance
        + cfg.z_loss * metrics["z_loss"]
    )
    np.testing.assert_allclose(metrics["loss"], total, rtol=LOSS_RTOL)


# -------------------------------------------------------------- expert bias
def _loads(out) -> dict:
    return {
        "moe_layers": {"blocks": {"ffn": {"router": {"bias": np.asarray(out.moe_stats.load)}}}},
        "mtp": {"modules": {"block": {"ffn": {"router": {"bias": np.asarray(out.mtp_stats.load)}}}}},
    }


def test_bias_update_follows_sign_rule(setup, step_m1):
    """b <- b + gamma * sign(mean(load) - load), loads from a forward pass (real tokens only)."""
    trainer, state, batch, forward = setup
    gamma = trainer.cfg.train.bias_update_speed
    new_state, _ = jax.device_get(step_m1(state, batch))
    out = jax.device_get(forward(state.params, state.biases, batch))
    loads = _loads(out)
    real = int(np.asarray(batch["segment_ids"] > 0).sum())
    k = trainer.cfg.model.num_experts_per_tok
    for load in jax.tree.leaves(loads):  # [layers, experts]: every real token counted K times
        np.testing.assert_array_equal(load.sum(-1), real * k)
    expected = jax.tree.map(
        lambda b, load: np.asarray(b, np.float64) + gamma * np.sign(load.mean(-1, keepdims=True) - load),
        jax.device_get(state.biases),
        loads,
    )
    changed = 0
    for (path, got), want, old in zip(
        jax.tree_util.tree_leaves_with_path(new_state.biases),
        jax.tree.leaves(expected),
        jax.tree.leaves(state.biases),
    ):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7, err_msg=jax.tree_util.keystr(path))
        changed += int(np.sum(np.asarray(got) != np.asarray(old)))
    assert changed > 0


def test_biases_get_no_gradient_and_no_optimizer_state(setup, step_m1):
    trainer, state, batch, _ = setup
    # not parameters: no leaf of params or of the optimizer state is a router bias
    for tree in (state.params, state.opt_state):
        names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
        assert not [n for n in names if "['bias']" in n]
    # and nothing differentiable depends on them: the gates use the unbiased scores, the bias
    # only enters the (top-k) selection
    cfg = trainer.cfg.model
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.standard_normal((64, cfg.n_routed_experts)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((64, cfg.num_experts_per_tok)), jnp.float32)
    bias = jnp.asarray(0.1 * rng.standard_normal(cfg.n_routed_experts), jnp.float32)
    grad = jax.grad(lambda b: jnp.sum(route(logits, b, cfg).weights * weights))(bias)
    np.testing.assert_array_equal(np.asarray(grad), 0.0)
    # the step changes each bias by exactly -gamma, 0 or +gamma (no optimizer update on top)
    gamma = trainer.cfg.train.bias_update_speed
    new_state, _ = jax.device_get(step_m1(state, batch))
    for new, old in zip(jax.tree.leaves(new_state.biases), jax.tree.leaves(jax.device_get(state.biases))):
        delta = (np.asarray(new, np.float64) - np.asarray(old, np.float64)) / gamma
        np.testing.assert_allclose(delta, np.round(delta), atol=1e-3)
        assert set(np.round(delta).astype(int).ravel()) <= {-1, 0, 1}


def test_expert_bias_shifts_routing(setup, step_m1):
    """A large bias on expert 0 sends every token to expert 0's group (experts 0 and 1 with
    n_group=2, top-1 group, K=2); one step then lowers exactly the overloaded experts' biases."""
    trainer, state, batch, forward = setup
    real = int(np.asarray(batch["segment_ids"] > 0).sum())
    base = jax.device_get(forward(state.params, state.biases, batch))
    boosted_biases = jax.tree.map(lambda b: b.at[..., 0].add(5.0), state.biases)
    boosted = jax.device_get(forward(state.params, boosted_biases, batch))
    for before, after in zip(jax.tree.leaves(_loads(base)), jax.tree.leaves(_loads(boosted))):
        assert not np.array_equal(before, after)
        np.testing.assert_array_equal(after[:, 0], real)
        np.testing.assert_array_equal(after[:, 1], real)
        np.testing.assert_array_equal(after[:, 2:], 0)
    # the output changes too: the bias picks experts, it is not just bookkeeping
    assert not np.allclose(base.logits, boosted.logits)
    gamma = trainer.cfg.train.bias_update_speed
    new_state, _ = jax.device_get(step_m1(state.replace(biases=boosted_biases), batch))
    for new, old in zip(jax.tree.leaves(new_state.biases), jax.tree.leaves(jax.device_get(boosted_biases))):
        np.testing.assert_allclose(new[:, :2], old[:, :2] - gamma, atol=1e-6)
        np.testing.assert_allclose(new[:, 2:], old[:, 2:] + gamma, atol=1e-6)


# ------------------------------------------------------------------ non-finite
def test_nonfinite_step_leaves_state_unchanged(setup, step_m1):
    trainer, state, batch, _ = setup
    poisoned = jax.tree.map(lambda x: x, state)
    kernel = poisoned.params["head"]["kernel"]
    poisoned.params["head"]["kernel"] = kernel.at[0, 0].set(jnp.nan)
    new_state, metrics = jax.device_get(step_m1(poisoned, batch))
    assert metrics["finite"] == 0
    assert not np.isfinite(metrics["loss"])
    old = jax.device_get(poisoned)
    for key in ("params", "biases", "opt_state", "rng"):
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(getattr(new_state, key)), jax.tree.leaves(getattr(old, key))
        ):
            np.testing.assert_array_equal(a, b, err_msg=f"{key}{jax.tree_util.keystr(path)}")
    # the step counter still advances (it numbers attempted steps, like the loop and checkpoints)
    assert int(new_state.step) == int(old.step) + 1


def test_nonfinite_batch_leaves_state_unchanged(setup, step_m1):
    """Token ids outside the vocabulary make the embedding gather return NaN."""
    trainer, state, batch, _ = setup
    bad = {**batch, "input_ids": batch["input_ids"].at[3, 2].set(trainer.cfg.model.vocab_size + 7)}
    new_state, metrics = jax.device_get(step_m1(state, bad))
    assert metrics["finite"] == 0
    old = jax.device_get(state)
    for key in ("params", "biases", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(new_state, key)), jax.tree.leaves(getattr(old, key))):
            np.testing.assert_array_equal(a, b)
    # and a finite step from the same state does change the params
    good_state, good = jax.device_get(step_m1(state, batch))
    assert good["finite"] == 1
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(good_state.params), jax.tree.leaves(old.params))
    )


@jax.custom_vjp
def _infinite_gradient(x):
    """The identity, whose backward pass returns +inf: a gradient that overflows while the loss
    itself stays finite."""
    return x


_infinite_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.inf),))


class _InfiniteGradient(Pretrain):
    """Pre-training with the same loss value and a non-finite gradient."""

    def __call__(self, model, mb, norm):
        loss, metrics, aux = super().__call__(model, mb, norm)
        return _infinite_gradient(loss), metrics, aux


def test_nonfinite_gradient_with_a_finite_loss_leaves_state_unchanged(setup):
    """The guard must look at the gradient, not only at the loss (one MoE layer, no MTP: the
    smallest model with every state part, compiled for this test alone)."""
    cfg = _cfg("model.num_layers=1", "model.first_k_dense=0", "model.mtp_depth=0")
    trainer = Trainer(
        cfg, objective=_InfiniteGradient(cfg.train, cfg.model, mask_documents=cfg.data.mask_documents)
    )
    state, batch = make_state(trainer, seed=0), setup[2]
    new_state, metrics = jax.device_get(jax.jit(trainer.train_step)(state, batch))
    assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
    assert metrics["finite"] == 0
    old = jax.device_get(state)
    for key in ("params", "biases", "opt_state", "rng"):
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(getattr(new_state, key)), jax.tree.leaves(getattr(old, key))
        ):
            np.testing.assert_array_equal(a, b, err_msg=f"{key}{jax.tree_util.keystr(path)}")
    assert int(new_state.step) == int(old.step) + 1


# ---------------------------------------------------------------- batch ramp
def _ramp_batch(batch: dict, rows: int, seed: int) -> dict:
    """`batch` at `rows` rows of the batch-size ramp: the rows past it are padding as the data
    pipeline makes them (segment id 0, loss mask 0), here holding random token ids."""
    rng = np.random.default_rng(seed)
    out = {k: np.array(v) for k, v in jax.device_get(batch).items()}
    for key in ("loss_mask", "segment_ids", "positions"):
        out[key][rows:] = 0
    for key in ("input_ids", "targets"):
        out[key][rows:] = rng.integers(0, 259, out[key][rows:].shape)
    return {k: jnp.asarray(v) for k, v in out.items()}


def test_padding_rows_of_the_batch_ramp_are_not_trained_on_or_counted(setup, step_m1):
    """The ramp's batch at 4 of 8 rows: the step counts 4 rows and the real targets of rows 0..3
    only (the normaliser; float64 numpy CE over those rows from the forward pass), and what the
    padding rows hold changes nothing.  Before: the step took its row count from the config's
    ramp, not from the batch (8 rows here)."""
    _, state, batch, forward = setup
    a, b = _ramp_batch(batch, 4, seed=3), _ramp_batch(batch, 4, seed=4)
    assert not np.array_equal(a["input_ids"], b["input_ids"])
    s_a, m_a = jax.device_get(step_m1(state, a))
    s_b, m_b = jax.device_get(step_m1(state, b))
    assert m_a["batch_rows"] == m_b["batch_rows"] == 4
    assert m_a["tokens"] == m_b["tokens"] == 32 + 32 + 24 + 24

    logits = np.asarray(jax.device_get(forward(state.params, state.biases, a)).logits[:4], np.float64)
    mask, targets = np.asarray(a["loss_mask"][:4], np.float64), np.asarray(a["targets"][:4])
    top = logits.max(-1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]
    ce = lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(m_a["ce_loss"], (ce * mask).sum() / mask.sum(), rtol=LOSS_RTOL)

    for key in ("ce_loss", "mtp_loss", "z_loss", "balance_loss", "loss", "grad_norm"):
        np.testing.assert_allclose(m_b[key], m_a[key], rtol=1e-6, err_msg=key)
    # padding tokens are still dispatched to experts: the summation order of the expert GEMMs moves,
    # hence the file's parameter tolerance (atol 1e-5; observed 2.5e-7 on one element of 4096)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s_b.params), jax.tree.leaves(s_a.params)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(s_b.biases), jax.tree.leaves(s_a.biases)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
