"""`frontier-jax eval`: perplexity / CE / bits per byte of every eval source, one JSON file and a
printed table.

    results.json = {"source": path, "step": s, "window": T, "stride": S, "config": {...},
                    "datasets": {name: {"ce", "perplexity", "bits_per_byte", "tokens", "bytes",
                                        "nll", "text_nll", "documents", "windows", "skipped"}},
                    "tasks": {name: {"acc", "acc_norm" | "exact_match", "rows", ...}}}
The file is written to a temporary name and renamed, so a failed run leaves none half written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from frontier_jax.data.template import ChatTemplate
from frontier_jax.eval.chat import ChatTask, run_chat
from frontier_jax.eval.config import EvalConfig, EvalSourceConfig
from frontier_jax.eval.datasets import TrainingRun, read_documents
from frontier_jax.eval.model import EvalModel
from frontier_jax.eval.perplexity import evaluate_documents
from frontier_jax.eval.scorer import Scorer
from frontier_jax.eval.tasks import Task, run_generate, run_multiple_choice
from frontier_jax.infer import Engine
from frontier_jax.runtime.program import inference_impl

_TASK_DECODING = {"max_seqs": 64}  # sequences decoded at once: a chat task samples n per prompt


def build_scorer(model: EvalModel, cfg: EvalConfig, *, progress: bool = True) -> tuple[Scorer, int]:
    """(Scorer of `model` over cfg's window, stride)."""
    context, stride = cfg.window(model.train_seq_len, model.program.cfg.model.max_position_embeddings)
    scorer = Scorer(
        model.program,
        model.params,
        model.biases,
        context=context,
        batch_size=cfg.batch_size,
        pad_id=model.tokenizer.pad_id,
        progress=progress,
    )
    return scorer, stride


def evaluate_sources(
    scorer: Scorer,
    tokenizer,
    sources: list[EvalSourceConfig],
    cfg: EvalConfig,
    stride: int,
    run: TrainingRun | None = None,
) -> dict[str, dict]:
    """{source name: figures} (`perplexity.evaluate_documents`) for each source; `run`: what the
    model was trained on (the held-out splits of `datasets.py`)."""
    out = {}
    for source in sources:
        docs = read_documents(source, cfg, tokenizer, run)
        figures = evaluate_documents(
            scorer, tokenizer, docs.documents, stride=stride, desc=f"eval {docs.name}"
        )
        out[docs.name] = {**figures, "skipped": docs.skipped}
    return out


def format_table(datasets: dict[str, dict]) -> str:
    header = (
        f"{'dataset':<24} {'tokens':>10} {'bytes':>10} {'CE (nats)':>10} {'perplexity':>11} {'bits/byte':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, f in datasets.items():
        lines.append(
            f"{name:<24} {f['tokens']:>10,} {f['bytes']:>10,} {f['ce']:>10.4f} {f['perplexity']:>11.3f} "
            f"{f['bits_per_byte']:>10.4f}"
        )
    return "\n".join(lines)


def write_results(out_dir: str | Path, results: dict) -> Path:
    """results.json under out_dir (process 0 only), atomically."""
    out_dir = Path(out_dir)
    path = out_dir / "results.json"
    if jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)
    return path


def evaluate_tasks(model: EvalModel, scorer: Scorer, tasks: list[Task | ChatTask]) -> dict[str, dict]:
    """{task name: metrics} (`tasks.py`, `chat.py`); generative tasks decode with `infer.Engine`."""
    out, engine = {}, None
    for task in tasks:
        if isinstance(task, Task) and task.type == "multiple_choice":
            out[task.name] = run_multiple_choice(task, scorer, model.tokenizer)
            continue
        if engine is None:
            engine = Engine.from_program(
                model.program, model.params, model.biases, tokenizer=model.tokenizer, infer=_TASK_DECODING
            )
        if isinstance(task, ChatTask):
            template = ChatTemplate.of_tokenizer(model.tokenizer.origin)
            out[task.name] = run_chat(task, engine, model.tokenizer, template)
        else:
            out[task.name] = run_generate(task, engine)
    return out


def evaluate(
    model: EvalModel,
    cfg: EvalConfig,
    sources: list[EvalSourceConfig],
    *,
    tasks: list[Task | ChatTask] = (),
    progress: bool = True,
) -> dict:
    """The results object of the module docstring."""
    scorer, stride = build_scorer(model, cfg, progress=progress)
    run = TrainingRun.of(model.config, model.step) if model.step is not None else None
    datasets = evaluate_sources(scorer, model.tokenizer, sources, cfg, stride, run)
    return {
        "source": model.source,
        "step": model.step,
        "window": scorer.context,
        "stride": stride,
        "batch_size": cfg.batch_size,
        "mesh": dict(model.program.mesh.shape),
        "config": model.config,
        "datasets": datasets,
        "tasks": evaluate_tasks(model, scorer, list(tasks)),
    }


def format_tasks(tasks: dict[str, dict]) -> str:
    lines = []
    for name, metrics in tasks.items():
        figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
        lines.append(f"task {name} ({metrics['rows']} rows): {figures}")
    return "\n".join(lines)


def training_evaluator(cfg, tokenizer, *, progress: bool = False):
    """`train.loop.train`'s evaluate hook: held-out figures of cfg.eval.data as
    {"eval/<source>/ce", "eval/<source>/perplexity", "eval/<source>/bits_per_byte"}.  The documents
    are read once; the scorer is built on the training mesh at the first call, and again when the
    program changes (a new context stage: other RoPE scaling), computing as
    `runtime.program.inference_impl` says (dropless expert dispatch whatever training uses, so the
    figures do not depend on eval.batch_size).  The window is eval.seq_len, or train.seq_len (with
    `train.stages`: the top-level one, the same in every stage)."""
    context, stride = cfg.eval.window(cfg.train.seq_len, cfg.model.max_position_embeddings)
    run = TrainingRun.of(cfg.to_dict(), cfg.train.steps)
    sources = [read_documents(s, cfg.eval, tokenizer, run) for s in cfg.eval.data]
    scorers: dict = {}

    def evaluate_now(program, params, biases) -> dict:
        if scorers.get("program") is not program:
            scorers["program"] = program
            scorers["scorer"] = Scorer(
                program.with_impl(inference_impl(program.cfg.impl)),
                params,
                biases,
                context=context,
                batch_size=cfg.eval.batch_size,
                pad_id=tokenizer.pad_id,
                progress=progress,
            )
        scorer = scorers["scorer"]
        scorer.params, scorer.biases = params, biases
        out = {}
        for docs in sources:
            figures = evaluate_documents(
                scorer, tokenizer, docs.documents, stride=stride, desc=f"eval {docs.name}"
            )
            out.update({f"eval/{docs.name}/{k}": figures[k] for k in ("ce", "perplexity", "bits_per_byte")})
        return out

    return evaluate_now
