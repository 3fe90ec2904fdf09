"""Reward-model training (`train.objective: preference`, objectives/preference.py) and its
evaluation (`frontier-jax eval --preferences`, eval/preferences.py).

- the Bradley-Terry loss with margin and centring, and its gradient in the scalar head's weight,
  equal a float64 numpy computation from the reference model's final-normed hidden states:
      L = sum_i [softplus(-(r_c - r_r - m)) + c (r_c + r_r)^2] / P,  r = g_last . w
      dL/dw = sum_i [-sigmoid(-(r_c - r_r - m)) (g_c - g_r) + 2 c (r_c + r_r) (g_c + g_r)] / P
- a reward model trained from an LM run (init_from) on pairs, then `eval --preferences`: its
  accuracy and mean margin equal a naive loop scoring each side alone with the float64 model;
- bad records and configs are one-line errors naming the file:line / field.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frontier_jax.cli import main
from frontier_jax.data import byte_tokenizer
from frontier_jax.data.preferences import pair_rows, read_preferences
from frontier_jax.runtime.program import build_model_program
from frontier_jax.runtime.restore import restore_params
from frontier_jax.train.loop import train
from frontier_jax.train.objectives.preference import Preference
from tests.model import reference as ref

from .common import read_metrics, tiny_config

SEQ = 48


def _cfg(*extra):
    return tiny_config(
        "model.head=scalar",
        "model.mtp_depth=0",
        "train.objective=preference",
        f"train.seq_len={SEQ}",
        "train.warmup_steps=0",
        *extra,
    )


def _merge(params: dict, biases: dict) -> dict:
    out = dict(params)
    for key, value in biases.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _f64(tree) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(tree))


def _last_hidden(params64: dict, rows: dict, cfg) -> np.ndarray:
    """g [B, d]: the float64 reference's final-normed hidden state at each row's last token."""
    h, _ = ref.trunk(params64, rows["input_ids"], cfg, rows["positions"], rows["segment_ids"])
    g = ref.rms_norm(h, params64["final_norm"]["scale"], cfg.rms_norm_eps)
    last = (rows["segment_ids"] > 0).sum(1) - 1
    return g[np.arange(len(g)), last]


def _pairs_file(path, n: int, seed: int) -> str:
    """Arithmetic answers: the right one chosen, a wrong one rejected; some pairs with a margin."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 50, 2))
        row = {"prompt": f"What is {a} + {b}?", "chosen": f"<answer>{a + b}</answer>"}
        row["rejected"] = f"<answer>{a + b + int(rng.integers(1, 9))}</answer>"
        if i % 3 == 0:
            row["margin"] = 0.5
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bradley_terry_loss_and_head_gradient_match_float64_numpy(tmp_path):
    cfg = _cfg(
        "train.preference.centring=0.1", f"train.preference.data={_pairs_file(tmp_path / 'p.jsonl', 4, 0)}"
    )
    program = build_model_program(cfg, jax.devices()[:1])  # (one device: the math, compiled quickly)
    params, biases = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())(3)
    tok = byte_tokenizer()
    pairs = read_preferences(cfg.train.preference.data, tok, None, max_len=SEQ)
    rows = pair_rows(pairs, SEQ, tok.pad_id)
    objective = Preference(cfg.train, cfg.model)

    def loss(p):
        mb = objective.prepare({k: jnp.asarray(v) for k, v in rows.items()}, {})
        value, metrics, _ = objective(program.model(p, biases), mb, objective.normalisers(mb, 1))
        return value, metrics

    (got, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    p64 = _merge(_f64(params), _f64(biases))
    g = _last_hidden(p64, rows, cfg.model)  # [2P, d]
    w = p64["score"]["kernel"][:, 0]
    r = g @ w
    rc, rr, m, c = r[0::2], r[1::2], rows["margin"][0::2].astype(np.float64), 0.1
    d = rc - rr - m
    nll = np.log1p(np.exp(-d))
    want = (nll + c * (rc + rr) ** 2).sum() / len(pairs)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bt_sum"]), nll.sum(), rtol=1e-5)
    sig = 1 / (1 + np.exp(d))
    grad_w = (-sig[:, None] * (g[0::2] - g[1::2]) + 2 * c * (rc + rr)[:, None] * (g[0::2] + g[1::2])).sum(0)
    np.testing.assert_allclose(
        np.asarray(grads["score"]["kernel"])[:, 0], grad_w / len(pairs), rtol=1e-4, atol=1e-7
    )


def test_a_reward_model_trains_from_an_lm_run_and_eval_preferences_equals_a_naive_loop(
    reference_run, tmp_path
):
    data = _pairs_file(tmp_path / "train.jsonl", 24, 1)
    held_out = _pairs_file(tmp_path / "held_out.jsonl", 6, 2)
    run = tmp_path / "rm"
    cfg = _cfg(f"train.init_from={reference_run}", f"train.preference.data={data}", "train.steps=3")
    history = train(cfg, run, progress=False)
    assert [r["step"] for r in history] == [1, 2, 3]
    assert {"bt_loss", "accuracy", "reward_margin"} <= set(read_metrics(run)[0])
    assert all(r["pairs"] == 4 for r in history)  # global_batch 8 rows = 4 pairs

    assert (
        main(["eval", "--checkpoint", str(run), "--preferences", held_out, "--out", str(tmp_path / "ev")])
        == 0
    )
    got = json.loads((tmp_path / "ev" / "results.json").read_text())["preferences"]

    restored = restore_params(run)
    p64 = _merge(_f64(restored.params), _f64(restored.biases))
    margins = []
    for pair in read_preferences(held_out, byte_tokenizer(), None, max_len=SEQ):
        r = []
        for ids in (pair.chosen, pair.rejected):  # each side alone, unpadded
            positions, segments = np.arange(len(ids))[None], np.ones((1, len(ids)), np.int32)
            values, _ = ref.segment_values(p64, ids[None], cfg.model, positions, segments, 1)
            r.append(values[0, 0])
        margins.append(r[0] - r[1])
    assert got["pairs"] == 6
    assert got["accuracy"] == np.mean(np.asarray(margins) > 0)
    np.testing.assert_allclose(got["mean_margin"], np.mean(margins), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2: field 'rejected' is missing"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, r"p.jsonl:2: field 'chosen' is empty"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            r"p.jsonl:2: .*two assistant turns",
        ),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, r"p.jsonl:2: field 'margin'"),
    ],
)
def test_a_bad_preference_record_is_an_error_naming_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n"
    )
    with pytest.raises(ValueError, match=message):
        read_preferences(path, byte_tokenizer(), None, max_len=SEQ)


def test_chat_records_with_two_final_assistant_turns_render_as_the_prompt_form(tmp_path):
    path = tmp_path / "p.jsonl"
    chat = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]
    path.write_text(
        json.dumps({"messages": chat})
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    first, second = read_preferences(path, byte_tokenizer(), None, max_len=SEQ)
    assert (
        first.chosen.tolist() == second.chosen.tolist()
        and first.rejected.tolist() == second.rejected.tolist()
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        ((), "needs train.preference.data"),
        (("train.preference.data=x.jsonl", "train.micro_batches=8"), "must be even"),
    ],
)
def test_preference_config_errors(extra, message):
    with pytest.raises(ValueError, match=message):
        _cfg(*extra).train.validate()


def test_the_preference_objective_refuses_a_language_model_head():
    cfg = tiny_config("train.objective=preference", "train.preference.data=x.jsonl")
    with pytest.raises(ValueError, match="model.head=lm: set model.head=scalar model.mtp_depth=0"):
        Preference(cfg.train, cfg.model)
