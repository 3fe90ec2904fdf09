"""The engine-owner thread: the only thread that touches the `Engine`.

HTTP handlers (asyncio) hand it jobs; it submits them, runs `Engine.step()` while anything is
waiting or running (so concurrent requests share decode steps: continuous batching) and sleeps
on its command queue when idle.  Each token event (`on_token`) is put on its job's asyncio
queue with the time it was appended; `cancel` ends a job's requests before the next step, so
a cancelled request's slot and blocks are free within one step.  Anything else that reads the
engine (metrics, expert loads) runs here too, through `call`.

Latency metrics are observed here, at the time a token is appended: time to first token and
queue time (arrival -> admission into a decode slot) per request, inter-token latency per token
after the first, end-to-end latency at the end (`metrics.py`).

On a multi-process mesh the thread runs on process 0 and drives the engine through a
`replicate.Leader`, which hands every submission, cancellation and step to the other processes;
when stopped it stops them too."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

from frontier_jax.infer import Engine, SamplingParams, TokenEvent
from frontier_jax.serve.metrics import Metrics
from frontier_jax.serve.replicate import Leader


@dataclasses.dataclass(eq=False)
class Job:
    """One HTTP request: its prompts (token ids), each sampled params.n times.  `events` gets
    (prompt index, TokenEvent, error message or None) items in the handler's event loop."""

    prompts: list[list[int]]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_ids: list[int] = dataclasses.field(default_factory=list)  # engine id of each prompt's sample 0
    open: int = 0  # requests not finished yet
    last_token: dict[int, float] = dataclasses.field(default_factory=dict)  # request id -> time


class EngineLoop:
    """leader: on a multi-process mesh, process 0's `replicate.Leader` over `engine`, through
    which submissions, cancellations and steps go (broadcast to the other processes)."""

    def __init__(self, engine: Engine, metrics: Metrics, leader: Leader | None = None):
        self.engine, self.metrics, self.leader = engine, metrics, leader
        self._driver = leader or engine  # what submits, cancels and steps
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._pending = 0  # jobs handed over, not submitted yet
        self._queued: dict[int, Job] = {}  # request id -> job, until admitted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.waiting = 0  # requests not admitted yet (pending jobs' included)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread after its current step (waiting up to 10 s; a leader: until its
        followers have stopped too, or its timeout)."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(10.0 if self.leader is None else self.leader.timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ------------------------------------------------------------------ from handlers
    def submit(self, job: Job) -> None:
        with self._lock:
            self._pending += len(job.prompts) * job.params.n
            self.waiting += len(job.prompts) * job.params.n
        self._commands.put(lambda: self._submit(job))

    def cancel(self, job: Job) -> None:
        self._commands.put(lambda: self._cancel(job))

    def post(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Runs fn(engine) in the engine thread before its next step; its result or error comes
        in the returned future.  Commands run in the order they are posted.  fn only reads the
        engine: on a multi-process mesh, a change it made would not reach the other processes."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                future.set_result(fn(self.engine))
            except BaseException as err:  # handed to the caller
                future.set_exception(err)

        self._commands.put(run)
        return future

    async def call(self, fn: Callable[[Engine], object]):
        """fn(engine), run in the engine thread between steps (`post`), awaited."""
        return await asyncio.wrap_future(self.post(fn))

    # ------------------------------------------------------------------ engine thread
    def _submit(self, job: Job) -> None:
        samples = job.params.n
        with self._lock:
            self._pending -= len(job.prompts) * samples
        job.open = len(job.prompts) * samples
        for k, prompt in enumerate(job.prompts):
            first = self._driver.submit(
                prompt, job.params, on_token=lambda event, k=k: self._deliver(job, k, event)
            )
            job.first_ids.append(first)
            for request_id in range(first, first + samples):
                if self.engine.result(request_id) is None:
                    self._queued[request_id] = job

    def _cancel(self, job: Job) -> None:
        for first in job.first_ids:
            for request_id in range(first, first + job.params.n):
                self._queued.pop(request_id, None)
                if self.engine.result(request_id) is None:
                    self._driver.cancel(request_id)

    def _deliver(self, job: Job, k: int, event: TokenEvent) -> None:
        now = time.perf_counter()
        error = None
        if event.finish_reason == "error":
            error = self.engine.result(event.request_id).error
        elif event.token is not None:
            last = job.last_token.get(event.request_id)
            if last is None:
                if self._queued.pop(event.request_id, None) is not None:  # admitted in this step
                    self.metrics.queue_time.observe(now - job.arrival)
                self.metrics.time_to_first_token.observe(now - job.arrival)
                self.metrics.prompt_tokens.inc(len(job.prompts[k]))
            else:
                self.metrics.inter_token_latency.observe(now - last)
            job.last_token[event.request_id] = now
            self.metrics.generation_tokens.inc()
        if event.finish_reason is not None:
            self._queued.pop(event.request_id, None)
            job.open -= 1
            self.metrics.finished(event.finish_reason, now - job.arrival)
        job.loop.call_soon_threadsafe(job.events.put_nowait, (k, event, error))

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop.is_set():
                idle = engine.scheduler.idle
                try:
                    command = self._commands.get(timeout=0.05) if idle else self._commands.get_nowait()
                except queue.Empty:
                    command = None
                while command is not None:
                    command()
                    try:
                        command = self._commands.get_nowait()
                    except queue.Empty:
                        command = None
                if not engine.scheduler.idle:
                    self._driver.step()
                    self._note_admissions()
                elif self.leader is not None:
                    self.leader.idle()
                with self._lock:
                    self.waiting = self._pending + sum(len(r.group) for r in engine.scheduler.waiting)
            if self.leader is not None:
                self.leader.stop()
        except BaseException as err:  # the server answers 503 from now on (`alive`)
            self.error = err
            raise

    def _note_admissions(self) -> None:
        """Queue time of the requests admitted into decode slots in the last step."""
        if not self._queued:
            return
        now = time.perf_counter()
        for request in self.engine.scheduler.running:
            job = self._queued.pop(request.id, None)
            if job is not None:
                self.metrics.queue_time.observe(now - job.arrival)
