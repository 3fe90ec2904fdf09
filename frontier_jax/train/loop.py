"""The host-side training loop: data, jitted steps, logging, checkpoints, resume, signals.

    run_dir/
      checkpoints/<step>/   orbax checkpoints (state, data iterator, config)
      metrics.jsonl         one JSON object per logged step ({"step", "loss", ...})
      tensorboard/          TensorBoard event files
      loss.png              loss curve, written at the end
      config.yaml           the resolved config of the latest start

Running the same command on the same run_dir resumes from the latest checkpoint: same next
batch, same loss.  SIGTERM/SIGINT: save a checkpoint at the current step and exit cleanly.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from frontier_jax.data import DataStats, build_train_iterator
from frontier_jax.model.describe import describe
from frontier_jax.parallel.mesh import batch_sharding, check_batch_fits, state_shardings
from frontier_jax.runtime.program import build_model_program
from frontier_jax.train.checkpoint import Checkpointer, abstract_with_shardings, check_same_model
from frontier_jax.train.metrics import MetricsLogger, model_flops_utilization, plot_loss_curve
from frontier_jax.train.optimizer import batch_size_at
from frontier_jax.train.state import TrainState
from frontier_jax.train.step import Trainer

if TYPE_CHECKING:  # the composed config sits above train (frontier_jax.config imports train.config)
    from frontier_jax.config import Config

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class _StopSignal:
    """Records SIGTERM/SIGINT so the loop can checkpoint and exit between steps."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_state_shardings(trainer: Trainer, mesh) -> TrainState:
    """NamedShardings of the whole train state: parameters and biases by the rules table,
    optimizer moments like their parameters, step and rng replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = state_shardings(trainer.abstract_params, mesh, trainer.rules)
    opt_shapes = jax.eval_shape(trainer.optimizer.init,
                                jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype),
                                             jax.eval_shape(lambda: trainer.init(0).params)))
    opt = optax.tree_map_params(trainer.optimizer, lambda _, sharding: sharding, opt_shapes, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(params=params, biases=state_shardings(trainer.abstract_biases, mesh, trainer.rules),
                      opt_state=opt, step=replicated, rng=replicated)


class Runner(NamedTuple):
    """Everything a training loop needs for `cfg` on a mesh: `init(seed)` makes the sharded
    state, `step(state, batch)` is the jitted train step (state donated)."""
    trainer: Trainer
    mesh: Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable
    step: Callable


def build_runner(cfg: Config, devices=None) -> Runner:
    """The model program on a mesh over `devices` (default: all; `runtime.build_model_program`)
    -> Trainer, checked batch split, train-state and batch shardings, and the jitted init and step."""
    program = build_model_program(cfg, devices)
    trainer = Trainer(cfg, program=program)
    mesh = program.mesh
    check_batch_fits(cfg.train.global_batch, mesh, trainer.rules)
    shardings = train_state_shardings(trainer, mesh)
    in_batch = batch_sharding(mesh, trainer.rules)
    init = jax.jit(trainer.init, static_argnums=0, out_shardings=shardings)
    batch_shardings = {k: in_batch for k in trainer.objective.batch_spec}
    step = jax.jit(trainer.train_step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
    return Runner(trainer, mesh, shardings, in_batch, init, step)


def data_iterator(cfg: Config):
    """The grain iterator of the global batches, the same on every process (see `_global_batch`).
    Batch k reads only the batch-size ramp's rows at step k; the rest of its rows are padding."""
    return build_train_iterator(cfg.data, seq_len=cfg.train.seq_len, global_batch=cfg.train.global_batch,
                                rows_at=lambda step: batch_size_at(cfg.train, step))


def _global_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Global [B, T] arrays from the whole global batch, which every process holds: each of this
    process's devices gets exactly the block `sharding` assigns it, so every layout is right: rows
    split across processes (data, fsdp, expert spanning hosts), replicated across them (tensor
    spanning hosts), or both."""
    def assemble(host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return {k: assemble(np.asarray(v)) for k, v in batch.items()}


def train(cfg: Config, run_dir: str | Path, *, progress: bool = True) -> list[dict]:
    """Trains (or resumes) `cfg` in `run_dir` until `cfg.train.steps`; returns logged metrics."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    runner = build_runner(cfg)
    trainer, in_batch = runner.trainer, runner.batch_sharding

    data = data_iterator(cfg)
    checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
    start = checkpointer.latest_step()
    if start is not None:
        check_same_model(checkpointer.read_config(start), cfg.to_dict(), checkpointer.directory)
        abstract = abstract_with_shardings(jax.eval_shape(lambda: trainer.init(0)), runner.state_shardings)
        state = checkpointer.restore(start, abstract, data)
        log.info("resumed from step %d in %s", start, checkpointer.directory)
    else:
        start = 0
        state = runner.init(cfg.train.seed)

    step_fn, batch_spec = runner.step, trainer.objective.batch_spec
    flops_per_token = describe(cfg.model, cfg.train.seq_len)["flops_per_token"]
    logger = MetricsLogger(run_dir, enabled=jax.process_index() == 0)
    history: list[dict] = []
    last_saved = start
    bar = tqdm(total=cfg.train.steps, initial=start, disable=not progress or jax.process_index() != 0,
               desc="train", unit="step", dynamic_ncols=True)
    try:
        with _StopSignal() as stop:
            for step in range(start, cfg.train.steps):
                local = next(data)
                batch = _global_batch({k: np.asarray(local[k], dtype) for k, dtype in batch_spec.items()},
                                      in_batch)
                t0 = time.perf_counter()
                state, metrics = step_fn(state, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                record = _record(step + 1, metrics, seconds, flops_per_token)
                if not metrics["finite"]:
                    if cfg.train.on_nonfinite == "stop":
                        raise NonFiniteLossError(
                            f"step {step + 1}: loss {float(metrics['loss'])} / grad norm "
                            f"{float(metrics['grad_norm'])} is not finite; the update was not applied and the "
                            f"last good checkpoint (step {last_saved}) is kept. Lower train.lr, or set "
                            "train.on_nonfinite=skip to skip such steps")
                    log.warning("step %d: non-finite loss, update skipped", step + 1)
                if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                    record.update(DataStats.from_state(data.get_state()).as_metrics())
                    logger.log(record)
                    history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                bar.update(1)
                every = cfg.checkpoint.every
                if (every and (step + 1) % every == 0) or stop.received is not None:
                    checkpointer.save(step + 1, state, data, cfg.to_dict())
                    last_saved = step + 1
                if stop.received is not None:
                    log.warning("signal %d received: saved step %d, exiting", stop.received, step + 1)
                    break
            else:
                if last_saved != cfg.train.steps and start < cfg.train.steps:
                    checkpointer.save(cfg.train.steps, state, data, cfg.to_dict())
    finally:
        bar.close()
        checkpointer.close()
        logger.close()
    if jax.process_index() == 0 and history:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    return history


def _record(step: int, metrics: dict, seconds: float, flops_per_token: float) -> dict:
    record = {"step": step}
    for key, value in metrics.items():
        value = np.asarray(value)
        record[key] = value.item() if value.ndim == 0 else value.tolist()
    record["step_time_s"] = seconds
    record["tokens_per_s"] = record["tokens"] / seconds
    mfu = model_flops_utilization(flops_per_token, record["tokens_per_s"])
    if mfu is not None:
        record["mfu"] = mfu
    return record
