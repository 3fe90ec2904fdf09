"""Evaluation and training compute the same next-token CE on the same rows.

1. Pre-training packing (data.mask_documents=false, rows of concatenated documents): a 3-step
   training run on 8 devices checkpoints every step; the CE that training logs at step k (the batch of step
   k under the parameters after k - 1 updates) equals the `Scorer`'s CE of the very same rows
   (rebuilt by the training data iterator) under the parameters restored from checkpoint k - 1
   onto one device.
   This checks the restore (step and values), the data, and the evaluation forward (segment ids
   of one segment, positions 0..T-1) against the training forward (no segment ids).
2. Document rendering (data.mask_documents=true: one segment per document, positions restart):
   `evaluate_documents` of a list of documents (plain texts, one longer than the window, a chat
   with only the assistant turn scored) equals the training step's CE and token count on the
   rows the training packer makes of the same documents.
Tolerance: rtol 1e-5 on the mean CE (fp32 log-probabilities summed over ~100 tokens)."""

from __future__ import annotations

import json

import grain
import jax
import numpy as np

from frontier_jax.config import load_config
from frontier_jax.data import load_tokenizer
from frontier_jax.data.packing import pack_documents, padding_rows
from frontier_jax.eval.model import load_checkpoint
from frontier_jax.eval.perplexity import evaluate_documents
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.windows import Window
from frontier_jax.train.batches import data_iterator
from frontier_jax.train.loop import build_runner, train

from .common import DOCUMENTS, TINY_MODEL

SEQ_LEN = 16
ONE_DEVICE = ["mesh.data=1", "mesh.expert=1", "mesh.tensor=1"]
# weights large enough for sharp attention: at init_std 0.02 doubling every position changes the
# CE by 3e-6 relative, below the tolerance; at 0.2 by 8e-3 (segment masks matter at both)
SHARP = ["model.init_std=0.2"]


def _row_windows(batch: dict) -> list[Window]:
    """Each training row as one window of T pairs scored where the row's loss mask is 1."""
    return [
        Window(batch["input_ids"][r], batch["targets"][r], batch["loss_mask"][r], sequence=r)
        for r in range(len(batch["input_ids"]))
    ]


def test_training_ce_equals_eval_ce_of_the_same_rows_under_the_restored_checkpoint(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d * 3}) + "\n" for d in DOCUMENTS))
    cfg = load_config(
        "model/toy",
        TINY_MODEL
        + SHARP
        + [
            "mesh.data=8",  # trained data-parallel on 8 devices, evaluated on one
            f"train.seq_len={SEQ_LEN}",
            "train.global_batch=8",
            "train.steps=3",
            "train.warmup_steps=1",
            "train.lr=1e-2",  # the parameters move visibly between checkpoints
            "checkpoint.every=1",
            "checkpoint.keep=3",
            "checkpoint.async_save=false",
            f"data.sources=[{{name: train, kind: jsonl, path: {data}}}]",
        ],
    )
    one_device = load_config("model/toy", TINY_MODEL + SHARP + ONE_DEVICE).mesh
    logged = {r["step"]: r for r in train(cfg, tmp_path / "run", progress=False)}
    batches = data_iterator(cfg)
    batches = [{k: np.asarray(v) for k, v in next(batches).items()} for _ in range(3)]

    checkpoints = {
        step: load_checkpoint(str(tmp_path / "run"), step, mesh=one_device, dtype=None, devices=1)
        for step in (1, 2)
    }
    assert {step: m.step for step, m in checkpoints.items()} == {1: 1, 2: 2}
    first = checkpoints[1]
    scorer = Scorer(first.program, first.params, first.biases, context=SEQ_LEN, batch_size=8, progress=False)

    def eval_ce(step: int, batch: dict) -> tuple[float, int]:
        scorer.params, scorer.biases = checkpoints[step].params, checkpoints[step].biases
        windows = _row_windows(batch)
        logprobs = [lp for lp, _ in scorer.score(windows)]
        nll = -sum(float(np.sum(lp[w.scored == 1], dtype=np.float64)) for w, lp in zip(windows, logprobs))
        tokens = sum(int(w.scored.sum()) for w in windows)
        return nll / tokens, tokens

    for step in (1, 2):  # step k + 1 trained on batches[k] with the parameters of checkpoint k
        ce, tokens = eval_ce(step, batches[step])
        assert tokens == logged[step + 1]["tokens"]
        np.testing.assert_allclose(ce, logged[step + 1]["ce_loss"], rtol=1e-5)
    # another checkpoint's parameters give another CE on the same rows
    assert abs(eval_ce(1, batches[2])[0] - logged[3]["ce_loss"]) > 1e-3


def test_evaluate_documents_equals_training_ce_of_the_same_documents_packed_by_segment():
    cfg = load_config(
        "model/toy",
        TINY_MODEL
        + SHARP
        + ONE_DEVICE
        + [f"train.seq_len={SEQ_LEN}", "train.global_batch=8", "data.mask_documents=true"],
    )
    tokenizer = load_tokenizer("byte")
    documents = DOCUMENTS + [(("user", "2 + 2 = ?"), ("assistant", "4, since 2 + 2 = 4."))]
    assert max(len(d) for d in DOCUMENTS) + 1 > SEQ_LEN  # a document of several windows
    rows = list(
        pack_documents(
            grain.MapDataset.source(documents).to_iter_dataset(),
            tokenizer=tokenizer,
            seq_len=SEQ_LEN,
            mask_documents=True,
            num_bins=cfg.train.global_batch,
        )
    )
    assert len(rows) <= cfg.train.global_batch
    pad = padding_rows(cfg.train.global_batch - len(rows), SEQ_LEN, pad_id=tokenizer.pad_id)
    batch = {k: np.concatenate([np.stack([r[k] for r in rows]), pad[k]]) for k in pad}

    runner = build_runner(cfg, jax.devices()[:1])
    state = runner.init(cfg.train.seed)
    scorer = Scorer(
        runner.trainer.program, state.params, state.biases, context=SEQ_LEN, batch_size=2, progress=False
    )
    got = evaluate_documents(scorer, tokenizer, documents, stride=SEQ_LEN)  # before the step donates
    _, metrics = runner.step(state, {k: jax.device_put(v, runner.batch_sharding) for k, v in batch.items()})
    assert got["tokens"] == int(batch["loss_mask"].sum()) == int(metrics["tokens"])
    np.testing.assert_allclose(got["ce"], float(metrics["ce_loss"]), rtol=1e-5)
