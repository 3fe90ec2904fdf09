"""Worker processes that end with their parent.

A parent killed with SIGKILL (or dying any other way that skips its clean-up) cannot stop its
worker processes (the grain workers of `data.worker_count`, the shard writers of `data
prepare --workers`); left alone they run on, orphaned, until their current work is done.
`exit_with_parent(parent_pid)`, called in a worker as it starts, runs a daemon thread that
ends the worker within `POLL_S` seconds of its parent's death: an orphan is adopted by another
process (init or a subreaper), so its parent pid changes.  (Linux's PR_SET_PDEATHSIG would
fire when the *thread* that started the worker ends, and grain starts its workers from
short-lived threads.)
"""

from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5
EXIT_ORPHANED = 1


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os._exit(EXIT_ORPHANED)  # no clean-up: the parent that would read the results is gone


def exit_with_parent(parent_pid: int) -> None:
    """In a worker process started by `parent_pid`: end this process when that parent is gone
    (at once if it already is)."""
    threading.Thread(target=_watch, args=(parent_pid,), name="exit-with-parent", daemon=True).start()


def exit_with_grain_parent(parent_pid: int, worker_index: int, worker_count: int) -> None:
    """`exit_with_parent` as a grain `worker_init_fn` (called with the worker's index and count)."""
    exit_with_parent(parent_pid)
