"""Stop signals of the training loop: SIGTERM / SIGINT ask the loop to save and exit.

The first signal sets `received`; the loop saves a checkpoint after the current step and ends
with `Preempted` (the CLI's exit code EX_TEMPFAIL = 75, "run again").  From that moment the
process has `grace_s` seconds to get there: a loop stuck waiting (for data, a save, another
process) is ended by a watchdog thread.  A second signal ends the process at once.  Either way
the exit code is 75 and the latest complete checkpoint is where the next run resumes (orbax
writes each checkpoint into a temporary directory and renames it only when complete).

With several processes a signal may reach some of them only, or at different steps:
`should_stop()` all-gathers the flag every step, so that every process saves the same step.

Before the first step (config checks, model program, restore) there is no step to save: the
loop's setup asks `should_stop()` at its safe points (before it creates the run directory,
before it writes config.yaml) and ends with `Preempted` there, so nothing is half-written.
Earlier still, while the command starts (imports, config loading), `raise_on_stop_signals`
makes a signal raise `Preempted` at once: nothing has been written yet.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a scheduler requeues the job


class Preempted(Exception):
    """The run stopped on a signal after saving a checkpoint; running it again resumes."""


def _exit_now(message: str) -> None:
    print(f"preempted: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_PREEMPTED)


@contextlib.contextmanager
def raise_on_stop_signals():
    """Within the block SIGTERM / SIGINT raise `Preempted` at once (where `StopSignal` does not
    take over): for the start of a command, before it has written anything."""

    def handle(signum, frame):
        raise Preempted(
            f"{signal.Signals(signum).name} received while starting, before anything was written; "
            "run the same command again"
        )

    previous = {sig: signal.signal(sig, handle) for sig in StopSignal.SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignal:
    """Context manager that records SIGTERM / SIGINT for the loop (see the module docstring)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.received: int | None = None
        self._previous = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            _exit_now(f"second signal {signal.Signals(signum).name}: exiting at once, without saving")
        self.received = signum
        self._watchdog = threading.Timer(
            self.grace_s,
            _exit_now,
            args=(
                f"{signal.Signals(signum).name} received but the run did not save and stop within "
                f"{self.grace_s:g} s (checkpoint.stop_timeout_s); exiting without saving",
            ),
        )
        self._watchdog.daemon = True
        self._watchdog.start()

    def should_stop(self) -> bool:
        """Whether any process has received a stop signal (a collective on several processes)."""
        import jax  # here: the module is imported before jax, by the command's first lines
        import numpy as np
        from jax.experimental import multihost_utils

        local = self.received is not None
        if jax.process_count() == 1:
            return local
        return bool(np.any(multihost_utils.process_allgather(np.int32(local))))

    def signal_name(self) -> str:
        """The signal received here, or that another process received one."""
        return (
            signal.Signals(self.received).name
            if self.received is not None
            else "a stop signal on another process"
        )

    def __exit__(self, *exc) -> None:
        """Leave the block only once the final save is written: the watchdog stops here."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
