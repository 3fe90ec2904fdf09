"""Supervised fine-tuning on chats: the pre-training objective over the loss mask that packing
carries (assistant turns only), from another run's parameters.

- the loss of a packed batch of chats (JSONL, system / user / assistant turns, several per row,
  document-masked) equals a float64 numpy computation from the reference model's logits over the
  assistant tokens only: CE over the targets with loss_mask 1, MTP depth 1 over the targets one
  further that are loss-masked and in the same document; changing the targets of the other
  (prompt) tokens changes nothing;
- `train.init_from` an LM run, on the embedded chat arithmetic: the loss falls.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from frontier_jax.data import build_train_iterator, byte_tokenizer
from frontier_jax.runtime.program import build_model_program
from frontier_jax.train.loop import train
from frontier_jax.train.objectives.pretrain import Pretrain
from tests.model import reference as ref

from .common import tiny_config

CHATS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "<answer>5</answer>"},
        {"role": "user", "content": "And 7 - 9?"},
        {"role": "assistant", "content": "<answer>-2</answer>"},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": "What is 6 * 7?"}, {"role": "assistant", "content": "<answer>42</answer>"}],
]


def _f64(tree) -> dict:
    return jax.tree.map(lambda a: np.asarray(a, np.float64), jax.device_get(tree))


def _merge(params: dict, biases: dict) -> dict:
    out = dict(params)
    for key, value in biases.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _log_softmax(z: np.ndarray) -> np.ndarray:
    top = z.max(-1, keepdims=True)
    return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def test_sft_loss_is_the_float64_loss_of_the_assistant_tokens_only(tmp_path):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS * 2))
    cfg = tiny_config(
        "train.seq_len=128",
        "data.mask_documents=true",
        "data.shuffle=false",
        f"data.sources=[{{name: chat, kind: jsonl, path: {data}, format: chat}}]",
    )
    host = next(build_train_iterator(cfg.data, seq_len=128, global_batch=4))
    tok = byte_tokenizer()
    trained = [
        tok.decode(host["targets"][r][(host["loss_mask"][r] == 1) & (host["segment_ids"][r] == s)].tolist())
        for r in range(4)
        for s in set(host["segment_ids"][r]) - {0}
    ]
    answers = [
        "".join(m["content"] + "<|end|>" for m in chat if m["role"] == "assistant") for chat in CHATS * 2
    ]
    assert set(trained) == set(answers)  # each packed chat trains its answers, and nothing else

    program = build_model_program(cfg, jax.devices()[:1])
    params, biases = jax.jit(program.init, static_argnums=0, out_shardings=program.shardings())(5)
    objective = Pretrain(cfg.train, cfg.model, mask_documents=True)

    @jax.jit
    def metrics_of(batch):
        mb = objective.prepare(batch, {})
        norm = objective.normalisers(mb, 1)
        _, metrics, _ = objective(program.model(params, biases), mb, norm)
        return objective.summarize(metrics, norm)

    got = metrics_of({k: jnp.asarray(v) for k, v in host.items()})

    want = ref.transformer(
        _merge(_f64(params), _f64(biases)),
        host["input_ids"],
        cfg.model,
        host["positions"],
        host["segment_ids"],
    )
    mask = host["loss_mask"].astype(bool)
    logp = _log_softmax(want["logits"])
    ce = -np.take_along_axis(logp, host["targets"][..., None], -1)[..., 0]
    np.testing.assert_allclose(got["ce_loss"], ce[mask].mean(), rtol=1e-5)
    mtp_logp = _log_softmax(want["mtp_logits"][0])
    mtp = [
        -mtp_logp[r, i, host["targets"][r, i + 1]]
        for r in range(4)
        for i in range(127)
        if mask[r, i + 1] and host["segment_ids"][r, i + 1] == host["segment_ids"][r, i] != 0
    ]
    np.testing.assert_allclose(got["mtp_loss"], np.mean(mtp), rtol=1e-5)

    prompts_changed = dict(host)
    rng = np.random.default_rng(0)
    prompts_changed["targets"] = np.where(mask, host["targets"], rng.integers(0, 256, host["targets"].shape))
    assert (prompts_changed["targets"] != host["targets"]).any()
    again = metrics_of({k: jnp.asarray(v) for k, v in prompts_changed.items()})
    for key in ("ce_loss", "mtp_loss", "tokens"):
        assert float(again[key]) == float(got[key]), key


def test_sft_from_an_lm_run_on_chat_arithmetic_lowers_the_loss(reference_run, tmp_path):
    cfg = tiny_config(
        f"train.init_from={reference_run}",
        "train.steps=8",
        "train.seq_len=64",
        "data.mask_documents=true",
        "data.sources=[{name: chat_math, kind: embedded_chat_math}]",
    )
    history = train(cfg, tmp_path / "sft", progress=False)
    assert [r["step"] for r in history] == list(range(1, 9))
    first, last = np.mean([r["ce_loss"] for r in history[:2]]), np.mean([r["ce_loss"] for r in history[-2:]])
    assert last < 0.9 * first, (first, last)
