"""The host-side training loop: data, jitted steps, logging, checkpoints, resume, signals.

    run_dir/
      checkpoints/<step>/   orbax checkpoints (state, data iterator, config), and
                            expert_load.npz: the expert-load ledger's window at that step
      metrics.jsonl         one JSON object per logged step ({"step", "loss", ...,
                            "moe_window_load_max_over_mean": per MoE layer over the window})
      tensorboard/          TensorBoard event files
      loss.png              loss curve, written at the end
      config.yaml           the resolved config of the latest start
      run.lock              the running trainer's pid and host (one trainer per run_dir: run_lock.py)

Running the same command on the same run_dir resumes from the latest checkpoint that restores
(a broken one is moved aside, see checkpoint.py): same next batch, same loss, one metrics record
per step.  A run without checkpoints starts from fresh parameters, or from another run's with
`train.init_from` (init_from.py).  The objective (default `Pretrain`) and the batch source
(default the grain text pipeline of `data:`, batches.py) plug in: `train(cfg, run_dir,
objective=..., batches=...)`.  A run of several context stages (`train.stages`, phases.py)
rebuilds the model program, the jitted step and the data pipeline at each stage boundary and
carries the state over; a checkpoint holds its stage's data position and config, so resuming
anywhere is exact.  SIGTERM/SIGINT: save a checkpoint at the current step and raise `Preempted`
(signals.py); during setup, before the first step, raise it without writing anything.  Nothing
is written to run_dir before the config is known to run there (model, data stream and tokenizer
the same as the checkpoint's, tokenizer within the vocabulary) but the lock, which is removed
again when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import numpy as np
import optax
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from frontier_jax.data import Tokenizer, load_tokenizer
from frontier_jax.data.tokenizer import check_tokenizer, tokenizer_identity
from frontier_jax.model.describe import describe
from frontier_jax.parallel.mesh import batch_sharding, build_mesh, check_batch_fits, state_shardings
from frontier_jax.parallel.placement import imbalance
from frontier_jax.parallel.rules import RULE_SETS
from frontier_jax.runtime.expert_ledger import EXPERT_LOAD_FILE, ExpertLedger, read_ledger_steps
from frontier_jax.runtime.program import ModelProgram, build_model_program
from frontier_jax.train.batches import BatchSource, PreferenceBatches, TextBatches
from frontier_jax.train.checkpoint import (
    Checkpointer,
    abstract_with_shardings,
    check_same_data_stream,
    check_same_model,
    check_same_phase,
)
from frontier_jax.train.config import ObjectiveName
from frontier_jax.train.init_from import initial_parameters, read_source
from frontier_jax.train.metrics import MetricsLogger, model_flops_utilization, plot_loss_curve
from frontier_jax.train.objectives import Objective, extra_shardings
from frontier_jax.train.objectives.preference import Preference
from frontier_jax.train.phases import ContextPhase, check_phases_fit, checkpoint_phase, context_phases
from frontier_jax.train.run_lock import RunLock, RunLockedError
from frontier_jax.train.signals import Preempted, StopSignal
from frontier_jax.train.state import TrainState
from frontier_jax.train.step import EXPERT_LOAD, Trainer

if TYPE_CHECKING:  # the composed config sits above train (frontier_jax.config imports train.config)
    from frontier_jax.config import Config

log = logging.getLogger(__name__)
# max / mean expert load per MoE layer over the ledger's window (experts.window_steps steps)
WINDOW_IMBALANCE = "moe_window_load_max_over_mean"


class NonFiniteLossError(RuntimeError):
    pass


def train_state_shardings(trainer: Trainer, mesh) -> TrainState:
    """NamedShardings of the whole train state: parameters and biases by the rules table,
    optimizer moments like their parameters, step and rng replicated, the objective's state as
    the objective lays it out."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params = state_shardings(trainer.abstract_params, mesh, trainer.rules)
    opt_shapes = jax.eval_shape(
        trainer.optimizer.init,
        jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), jax.eval_shape(lambda: trainer.init(0).params)
        ),
    )
    opt = optax.tree_map_params(
        trainer.optimizer,
        lambda _, sharding: sharding,
        opt_shapes,
        params,
        transform_non_params=lambda _: replicated,
    )
    biases = state_shardings(trainer.abstract_biases, mesh, trainer.rules)
    return TrainState(
        params=params,
        biases=biases,
        opt_state=opt,
        step=replicated,
        rng=replicated,
        extra=extra_shardings(trainer.objective, params, biases),
    )


class Runner(NamedTuple):
    """Everything a training loop needs for `cfg` on a mesh: `init(seed)` makes the sharded
    state, `start(params, biases, seed)` the sharded state of step 0 from given parameters,
    `step(state, batch)` is the jitted train step (state donated)."""

    trainer: Trainer
    mesh: Mesh
    state_shardings: TrainState
    batch_sharding: NamedSharding
    init: Callable
    start: Callable
    step: Callable


def build_runner(
    cfg: Config, devices=None, *, mesh: Mesh | None = None, objective: Objective | None = None
) -> Runner:
    """The model program on `mesh` (default: `cfg.mesh` over `devices`, default all;
    `runtime.build_model_program`) -> Trainer (with `objective`, default `Pretrain`), checked
    batch split, train-state and batch shardings, and the jitted init, start and step."""
    program = build_model_program(cfg, devices, mesh=mesh)
    trainer = Trainer(cfg, program=program, objective=objective)
    mesh = program.mesh
    check_batch_fits(cfg.train.global_batch, mesh, trainer.rules)
    shardings = train_state_shardings(trainer, mesh)
    in_batch = batch_sharding(mesh, trainer.rules)
    init = jax.jit(trainer.init, static_argnums=0, out_shardings=shardings)
    start = jax.jit(trainer.start, static_argnums=2, out_shardings=shardings)
    batch_shardings = {k: in_batch for k in trainer.objective.batch_spec}
    step = jax.jit(
        trainer.train_step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return Runner(trainer, mesh, shardings, in_batch, init, start, step)


def device_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Global [B, T] arrays from the whole global batch, which every process holds: each of this
    process's devices gets exactly the block `sharding` assigns it, so every layout is right: rows
    split across processes (data, fsdp, expert spanning hosts), replicated across them (tensor
    spanning hosts), or both."""

    def assemble(host: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return {k: assemble(np.asarray(v)) for k, v in batch.items()}


def check_vocabulary(cfg: Config, tokenizer: Tokenizer) -> None:
    """Raises ValueError when the tokenizer has ids the model's embedding cannot hold (they would
    turn into NaN at the first step)."""
    size = tokenizer.vocab_size
    if size > cfg.model.vocab_size:
        raise ValueError(
            f"data.tokenizer={cfg.data.tokenizer!r} has {size} token ids but model.vocab_size="
            f"{cfg.model.vocab_size}: set model.vocab_size >= {size}, or use a smaller tokenizer"
        )


def _checkpoint_config(phase: ContextPhase, tokenizer: Tokenizer) -> dict:
    """The config saved with a checkpoint of `stage`: the stage's run config, its record and the
    identity of the run's tokenizer (the sha256 of its content, its size and special ids)."""
    return {**phase.cfg.to_dict(), "stage": phase.record(), "tokenizer": tokenizer_identity(tokenizer)}


def _resume(
    checkpointer: Checkpointer,
    runner: Runner,
    phases: list[ContextPhase],
    restart_data: bool,
    batches_for: Callable[[ContextPhase], BatchSource],
    fresh_state: Callable[[], TrainState],
    text: bool,
    tokenizer: Tokenizer,
):
    """(start step, state, stage, batch source): the newest checkpoint that restores, with its
    stage's batch source (`batches_for`) moved to its data position (or at the stream's start
    with `restart_data`), else `fresh_state()` at step 0 in the first stage.  `runner`: any
    stage's (same state layout); text: the sources are the text pipeline of `data:` (whose
    stream a checkpoint's data position must belong to).  A checkpoint trained with another
    tokenizer than `tokenizer` is refused."""
    opened = {}  # step -> the batch source restored to that checkpoint's position

    def check_config(step: int, saved: dict) -> None:
        phase = checkpoint_phase(phases, step)
        check_same_phase(saved, phase.record(), step, checkpointer.directory)
        check_same_model(saved, phase.cfg.to_dict(), checkpointer.directory)
        check_tokenizer(
            saved.get("tokenizer"),
            tokenizer,
            f"checkpoint {step} in {checkpointer.directory} was trained",
            "train with the tokenizer the run was trained with (the file changed since?), or use a new --run-dir",
        )
        if not restart_data and text:
            check_same_data_stream(saved, phase.cfg.to_dict(), checkpointer.directory)

    def data_for(step: int):
        if restart_data:
            return None
        opened[step] = batches_for(checkpoint_phase(phases, step))
        return opened[step]

    abstract = abstract_with_shardings(jax.eval_shape(lambda: runner.trainer.init(0)), runner.state_shardings)
    found = checkpointer.restore_latest(abstract, data_for, check_config)
    if found is None:
        return 0, fresh_state(), phases[0], batches_for(phases[0])
    start, state = found
    phase = checkpoint_phase(phases, start)
    log.info("resumed from step %d (context stage %d) in %s", start, phase.index, checkpointer.directory)
    if restart_data:
        log.warning("--restart-data: the data stream starts again from its beginning at step %d", start)
        return start, state, phase, batches_for(phase)
    return start, state, phase, opened[start]


def _nonfinite_error(step: int, metrics: dict, last_saved: int | None, skipped: int) -> NonFiniteLossError:
    kept = (
        f"the last good checkpoint (step {last_saved}) is kept"
        if last_saved is not None
        else "no checkpoint was written"
    )
    what = f"steps {step - skipped + 1}..{step} were all" if skipped > 1 else f"step {step}:"
    return NonFiniteLossError(
        f"{what} non-finite (loss {float(metrics['loss'])}, grad norm {float(metrics['grad_norm'])}); the update "
        f"was not applied and {kept}. Lower train.lr, check the data"
        + (
            ", or set train.on_nonfinite=skip to skip such steps"
            if skipped <= 1
            else f" (train.max_skipped_steps={skipped - 1} skipped steps in a row are allowed)"
        )
    )


def train(
    cfg: Config,
    run_dir: str | Path,
    *,
    progress: bool = True,
    restart_data: bool = False,
    evaluate: Callable[[ModelProgram, dict, dict], dict] | None = None,
    objective: Objective | None = None,
    batches: BatchSource | None = None,
) -> list[dict]:
    """Trains (or resumes) `cfg` in `run_dir` until `cfg.train.steps`; returns logged metrics.
    evaluate(program, params, biases) -> {name: figure}: called every `eval.every` steps, its
    figures logged with that step (held-out evaluation, given by the caller: `eval` sits above).
    objective: what is minimised (default: `Pretrain`, or `Preference` with its `PreferenceBatches` for
    train.objective=preference); batches: where the global batches come
    from (default the text pipeline of `cfg.data`, `TextBatches`; another source runs one context
    stage and is checkpointed through its get_state / set_state).

    Raises `Preempted` on SIGTERM/SIGINT (after saving; during setup, before anything is
    written), `RunLockedError` (another trainer holds `run_dir`: run_lock.py),
    `NonFiniteLossError`, `CheckpointError` (a save failed, or no checkpoint restores),
    `DataError`; ValueError for a config that cannot run (checked before anything is written
    to `run_dir`)."""
    run_dir = Path(run_dir)
    # The stop signals are caught from the start: during setup (no step to save yet) the run
    # ends with Preempted at the next safe point, before it writes anything.
    with StopSignal(cfg.checkpoint.stop_timeout_s) as stop, contextlib.ExitStack() as held:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.special_tokens)
        check_vocabulary(cfg, tokenizer)
        phases = context_phases(cfg)
        if cfg.train.objective == ObjectiveName.preference and objective is None:
            objective = Preference(cfg.train, cfg.model)
            batches = batches or PreferenceBatches(cfg)
        if batches is not None and len(phases) > 1:
            raise ValueError(
                f"train.stages: {len(phases)} context stages need the text pipeline of data: (each stage "
                "packs its own rows); a batch source of its own runs one stage: leave train.stages out"
            )
        mesh = build_mesh(cfg.mesh)
        check_phases_fit(phases, mesh, RULE_SETS[cfg.mesh.rules])  # every stage, before anything compiles
        runner = build_runner(phases[0].cfg, mesh=mesh, objective=objective)
        source = None  # train.init_from, checked before anything is written (a new run directory)
        if cfg.train.init_from and not (run_dir / "checkpoints").exists():
            source = read_source(cfg.train.init_from, cfg.model)
        if stop.should_stop():
            raise _stopped_in_setup(stop, run_dir)

        def fresh_state() -> TrainState:
            seed = cfg.train.seed
            if not cfg.train.init_from:
                return runner.init(seed)
            start_from = source or read_source(cfg.train.init_from, cfg.model)
            return runner.start(*initial_parameters(start_from, runner.trainer.program, seed), seed)

        def batches_for(phase: ContextPhase) -> BatchSource:
            return TextBatches(phase.cfg) if batches is None else batches

        fresh = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        held.enter_context(_run_dir_lock(run_dir))
        checkpointer = Checkpointer(run_dir / "checkpoints", cfg.checkpoint)
        try:
            start, state, phase, data = _resume(
                checkpointer,
                runner,
                phases,
                restart_data,
                batches_for,
                fresh_state,
                text=batches is None,
                tokenizer=tokenizer,
            )
            if stop.should_stop():  # (a restore can take minutes)
                raise _stopped_in_setup(stop, run_dir)
        except BaseException:
            checkpointer.close()
            if fresh:  # a new run that cannot start (bad data, e.g. a corrupt shard) leaves nothing behind
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        data.use_program(runner.trainer.program)
        if start >= cfg.train.steps:
            checkpointer.close()
            log.warning(
                "nothing to train: the latest checkpoint in %s is step %d and train.steps=%d%s; "
                "raise train.steps above %d to train on",
                checkpointer.directory,
                start,
                cfg.train.steps,
                " is below it" if start > cfg.train.steps else "",
                start,
            )
            return []
        (run_dir / "config.yaml").write_text(cfg.to_yaml())  # only once the config is known to run here
        if phase.index:
            runner = build_runner(phase.cfg, mesh=mesh, objective=objective)
        flops_per_token = _flops_per_token(phase, runner)
        logger = MetricsLogger(run_dir, enabled=jax.process_index() == 0, resumed_at=start)
        ledger = _expert_ledger(cfg, checkpointer.directory / str(start) if start else None)
        history: list[dict] = []
        last_saved = start or None
        skipped = 0  # non-finite steps in a row
        stopped = None
        bar = tqdm(
            total=cfg.train.steps,
            initial=start,
            disable=not progress or jax.process_index() != 0,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        try:
            for step in range(start, cfg.train.steps):
                if step >= phase.until_step:  # the next context stage: new rows, RoPE and step
                    phase = phases[phase.index + 1]
                    runner = build_runner(phase.cfg, mesh=mesh, objective=objective)
                    flops_per_token = _flops_per_token(phase, runner)
                    data = TextBatches(phase.cfg, continue_from=data.get_state())
                    log.info(
                        "step %d: context stage %d, %d tokens x %d rows",
                        step,
                        phase.index,
                        phase.cfg.train.seq_len,
                        phase.cfg.train.global_batch,
                    )
                local = data.next(state)
                batch = device_batch(
                    {
                        k: np.asarray(local[k], dtype)
                        for k, dtype in runner.trainer.objective.batch_spec.items()
                    },
                    runner.batch_sharding,
                )
                t0 = time.perf_counter()
                state, metrics = runner.step(state, batch)
                metrics = jax.device_get(metrics)
                seconds = time.perf_counter() - t0
                data.after_update(state)
                _record_expert_load(ledger, metrics.pop(EXPERT_LOAD, None), cfg.model.num_experts_per_tok)
                checkpointer.poll()  # a failed background save stops the run here
                record = _record(step + 1, metrics, seconds, flops_per_token)
                record.update(stage=phase.index, seq_len=phase.cfg.train.seq_len)
                skipped = 0 if metrics["finite"] else skipped + 1
                last_step = step + 1 == cfg.train.steps
                evaluated = evaluate is not None and cfg.eval.every and (step + 1) % cfg.eval.every == 0
                if evaluated:
                    record.update(evaluate(runner.trainer.program, state.params, state.biases))
                if evaluated or (step + 1) % cfg.train.log_every == 0 or last_step or skipped:
                    record.update(data.metrics(step + 1))
                    window = ledger.window()
                    if window.tokens:
                        record[WINDOW_IMBALANCE] = imbalance(window.load)[0].tolist()
                    logger.log(record)
                    history.append(record)
                if skipped and (cfg.train.on_nonfinite == "stop" or skipped > cfg.train.max_skipped_steps):
                    raise _nonfinite_error(step + 1, metrics, last_saved, skipped)
                if skipped:
                    log.warning("step %d: non-finite loss, update skipped", step + 1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}",
                    **({"tok_s": f"{record['tokens_per_s']:,.0f}"} if "tokens_per_s" in record else {}),
                    **data.progress(),
                )
                bar.update(1)
                every = cfg.checkpoint.every
                stopping = stop.should_stop()
                if (every and (step + 1) % every == 0) or stopping or (last_step and last_saved != step + 1):
                    checkpointer.save(
                        step + 1,
                        state,
                        data,
                        _checkpoint_config(phase, tokenizer),
                        expert_load=ledger.steps() if cfg.model.num_moe_layers else None,
                    )
                    last_saved = step + 1
                if stopping:
                    stopped = step + 1
                    break
        finally:
            bar.close()
            logger.close()
            checkpointer.close()  # waits for the last save (bounded by the watchdog after a signal)
    if jax.process_index() == 0 and history:
        plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if stopped is not None:
        raise Preempted(
            f"{stop.signal_name()} received: saved step {stopped} in {checkpointer.directory}; "
            "run the same command to resume"
        )
    return history


def _stopped_in_setup(stop: StopSignal, run_dir: Path) -> Preempted:
    return Preempted(
        f"{stop.signal_name()} received during setup, before the first step: nothing was trained "
        f"or written in {run_dir}; run the same command again"
    )


@contextlib.contextmanager
def _run_dir_lock(run_dir: Path):
    """The run directory's lock (run_lock.py), taken by process 0 for all processes: the others
    learn whether it got it, and all refuse together."""
    lock, refused = None, None
    if jax.process_index() == 0:
        try:
            lock = RunLock.acquire(run_dir)
        except RunLockedError as err:
            refused = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if np.any(multihost_utils.process_allgather(np.int32(refused is not None))) and refused is None:
            refused = RunLockedError(
                f"process 0 could not lock the run directory {run_dir} (its log says why)"
            )
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _flops_per_token(phase: ContextPhase, runner: Runner) -> float:
    params = runner.trainer.program.abstract_params
    return describe(phase.cfg.model, phase.cfg.train.seq_len, params=params)["flops_per_token"]


def _expert_ledger(cfg: Config, step_dir: epath.Path | None) -> ExpertLedger:
    """The expert-load ledger, refilled with the window saved in `step_dir` (the checkpoint the
    run resumes from) when it has one, so a resumed run logs what the straight run logs."""
    ledger = ExpertLedger(cfg.model.num_moe_layers, cfg.model.n_routed_experts, cfg.experts.window_steps)
    if step_dir is not None and (step_dir / EXPERT_LOAD_FILE).exists():
        ledger.extend(read_ledger_steps(step_dir / EXPERT_LOAD_FILE))
    return ledger


def _record_expert_load(ledger: ExpertLedger, load: np.ndarray | None, top_k: int) -> None:
    """A step's expert loads [L_moe, N_r] (None: no MoE layer) into the ledger, with its routed
    tokens (each adds top_k assignments to every layer's row)."""
    if load is not None:
        load = np.rint(load).astype(np.int64)  # fp32 counts of whole assignments
        ledger.record(load, int(load[0].sum()) // top_k)


def _record(step: int, metrics: dict, seconds: float, flops_per_token: float) -> dict:
    record = {"step": step}
    for key, value in metrics.items():
        value = np.asarray(value)
        record[key] = value.item() if value.ndim == 0 else value.tolist()
    record["step_time_s"] = seconds
    if "tokens" in record:  # an objective that counts the tokens it trains on
        record["tokens_per_s"] = record["tokens"] / seconds
        mfu = model_flops_utilization(flops_per_token, record["tokens_per_s"])
        if mfu is not None:
            record["mfu"] = mfu
    return record
