"""Serving on a multi-process mesh: every process runs the same engine steps.

Each process holds an engine over its devices of the global mesh, and every step is a
collective program, so all processes must run the same steps on the same requests.  Process 0
(the leader) serves HTTP; its engine thread goes through `Leader`, which records each submission
(prompt ids, `SamplingParams`) and cancellation in the order it applies them and, before each
`Engine.step()`, broadcasts them as one control message.  The other processes (followers) run
`follow`: receive a message, apply its submissions and cancellations in the same order (so
request ids and scheduler state match), step when the leader steps, return when it stops.

Transport: `jax.experimental.multihost_utils.broadcast_one_to_all`, a collective over every
process (on CPU through gloo), twice per message: its byte length, then its JSON padded to a
power of two (so a handful of programs compile).  It is part of jax's public multi-host API and
orders messages with the steps' own collectives.  While idle the leader broadcasts an empty
message every `IDLE_BEAT_S` seconds: followers wait in that collective (blocked, not spinning)
and a follower that has gone is found within a beat (its broken connection fails the
collective).  A broadcast or step of the leader that raises, or does not return within
`serve.follower_timeout_s` seconds, means a follower has gone or hangs: the leader prints one
`error:` line and exits (`Watchdog`, exit EXIT_FOLLOWER_LOST); a follower whose broadcast fails
(process 0 has gone) does the same."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
from jax.experimental import multihost_utils

from frontier_jax.infer import Engine, SamplingParams, TokenEvent

IDLE_BEAT_S = 0.5  # an idle leader's message rate (followers wake this often)
MIN_MESSAGE_BYTES = 256
EXIT_FOLLOWER_LOST = 8  # README "When things go wrong"


def _broadcast(message: dict | None) -> dict:
    """`message` from process 0 on every process (None on the others)."""
    data = json.dumps(message).encode() if message is not None else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
    padded = np.zeros(max(MIN_MESSAGE_BYTES, 1 << (size - 1).bit_length()), np.uint8)
    padded[: len(data)] = np.frombuffer(data, np.uint8)
    received = multihost_utils.broadcast_one_to_all(padded)
    return json.loads(received[:size].tobytes())


def _params(fields: dict) -> SamplingParams:
    return SamplingParams(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def stop_process(message: str) -> None:
    """One `error:` line, then this process ends at once (exit EXIT_FOLLOWER_LOST): without
    every process, no engine step can run."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_FOLLOWER_LOST)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Watchdog:
    """Stops the process (`stop_process`) when a guarded broadcast or step runs longer than
    `timeout_s` seconds or raises."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._since: float | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, name="follower-watchdog", daemon=True).start()

    def __enter__(self) -> Watchdog:
        with self._lock:
            self._since = time.monotonic()
        return self

    def __exit__(self, kind, err, traceback) -> None:
        with self._lock:
            self._since = None
        if isinstance(err, Exception):
            stop_process(
                f"a serving step failed on process 0 ({_first_line(err)}): a follower process has "
                "failed (see its log); stopping"
            )

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 4))
            with self._lock:
                stuck = self._since is not None and time.monotonic() - self._since > self.timeout_s
            if stuck:
                stop_process(
                    f"a serving step did not complete on every process within serve.follower_timeout_s="
                    f"{self.timeout_s:g} s: a follower process has failed or hangs (see its log); stopping"
                )


class Leader:
    """Process 0's engine, for the engine thread: `submit`, `cancel` and `step` as the engine's,
    each change recorded and broadcast to the followers before the step that follows it."""

    def __init__(self, engine: Engine, timeout_s: float):
        self.engine, self.timeout_s = engine, timeout_s
        self._ops: list[list] = []
        self._last = time.monotonic()
        self._watchdog = Watchdog(timeout_s)

    def submit(
        self, prompt: list[int], params: SamplingParams, on_token: Callable[[TokenEvent], None]
    ) -> int:
        self._ops.append(["submit", list(prompt), dataclasses.asdict(params)])
        return self.engine.submit(prompt, params, on_token=on_token)

    def cancel(self, request_id: int) -> bool:
        self._ops.append(["cancel", request_id])
        return self.engine.cancel(request_id)

    def step(self) -> list[int]:
        with self._watchdog:
            self._send(step=True)
            return self.engine.step()

    def idle(self) -> None:
        """Between steps with nothing to run: the pending changes, or a beat every IDLE_BEAT_S."""
        if self._ops or time.monotonic() - self._last >= IDLE_BEAT_S:
            with self._watchdog:
                self._send(step=False)

    def stop(self) -> None:
        """The followers apply what is pending and return from `follow`."""
        with self._watchdog:
            self._send(step=False, stop=True)

    def _send(self, *, step: bool, stop: bool = False) -> None:
        _broadcast({"ops": self._ops, "step": step, "stop": stop})
        self._ops, self._last = [], time.monotonic()


def follow(engine: Engine) -> None:
    """A follower's loop: the leader's submissions and cancellations, then its step, until it
    stops.  A broken collective (process 0 has gone) stops this process (`stop_process`)."""
    while True:
        try:
            message = _broadcast(None)
        except Exception as err:
            stop_process(f"process 0 has gone without stopping this process ({_first_line(err)}); stopping")
        for op in message["ops"]:
            if op[0] == "submit":
                engine.submit(op[1], _params(op[2]))
            else:
                engine.cancel(op[1])
        if message["stop"]:
            return
        if message["step"]:
            try:
                engine.step()
            except Exception as err:
                stop_process(f"an engine step failed on this process ({_first_line(err)}); stopping")
