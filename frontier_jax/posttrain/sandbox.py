"""Run untrusted Python (a sample's code and its tests) in a confined process.

One process per sample, in a fresh temporary directory, started by exec (`subprocess.Popen`
without `preexec_fn`: safe from a process that holds JAX threads), in a new session, with a
scrubbed environment, and `sandbox_launcher.py` confining itself before it runs the code.  The
strongest tier this machine allows is used (`sandbox_tier`, logged once):

  1 `namespaces`: `unshare -Urnpf --mount-proc --kill-child`: new user, network (no interface
    up), pid and mount namespaces; every mount read-only, a tmpfs working directory, no
    capabilities; killing the launcher (pid 1 of the namespace) kills every process in it.
  2 `uid` (root without user namespaces): the launcher runs as a fresh unprivileged uid, so it
    writes only its directory and world-writable ones, sees no other process's environment and
    cannot signal the caller; sockets are blocked; afterwards every process of that uid is killed.
  3 `unconfined`: rlimits, a new session and blocked sockets only; refused unless asked for
    (`SandboxRefused`).

Every tier sets RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE and RLIMIT_NPROC and a wall-clock limit that
kills the whole process group; stdout and stderr are kept up to `output_bytes` each, and a sample
that writes more is killed and fails.  The verdict passes only when the launcher writes
`passed NONCE` to its verdict pipe, which it does after the program (tests included) returned
normally; a program that exits early, crashes, prints a fake "passed" line or runs out of a limit
fails.  A sandbox that cannot start is `unavailable` (a reward of None, not 0).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
TIERS = ("namespaces", "uid", "unconfined")
_LAUNCHER_FAILED = 120  # the launcher's exit code when it could not confine itself
_SANDBOX_UID_BASE = 1_000_000  # tier 2: a fresh unprivileged uid per sample above this


class SandboxRefused(ValueError):
    """No confining tier is available and the unconfined one was not allowed (a configuration
    error: exit 2 from the CLIs)."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 1 << 30  # address space
    file_bytes: int = 16 << 20  # largest file it may write (and the tmpfs working directory)
    processes: int = 32
    output_bytes: int = 64 << 10  # kept per stream; more fails the sample


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str  # passed | failed | unavailable
    reason: str  # "" when passed; else what ended it (exit code, limit, launcher error)
    tier: str
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare_command() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    return [unshare, "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]


@functools.cache
def sandbox_tier() -> str:
    """The strongest tier that runs a trivial program to a pass on this machine (probed once)."""
    for tier in TIERS[:2]:
        if tier == "uid" and os.geteuid() != 0:
            continue
        result = _run(tier, "pass", SandboxLimits(wall_s=30.0))
        if result.passed:
            log.info("sandbox tier: %s", tier)
            return tier
        log.info("sandbox tier %s unavailable: %s", tier, result.reason)
    log.warning("sandbox tier: unconfined (no user namespaces and not root)")
    return "unconfined"


class Sandbox:
    """Runs programs under `limits` in the strongest available tier (or the one named)."""

    def __init__(
        self, limits: SandboxLimits = SandboxLimits(), *, unconfined: bool = False, tier: str | None = None
    ):
        self.limits = limits
        self.tier = tier or sandbox_tier()
        if self.tier not in TIERS:
            raise ValueError(f"sandbox tier {self.tier!r} is not one of {', '.join(TIERS)}")
        if self.tier == "unconfined" and not unconfined:
            raise SandboxRefused(
                "no confining sandbox on this machine (user namespaces refused and not root): "
                "code rewards are refused; set rewards.unconfined_sandbox=true to run them with rlimits only"
            )

    def run(self, program: str) -> SandboxResult:
        return _run(self.tier, program, self.limits)

    def run_many(self, programs: Sequence[str], workers: int = 2) -> list[SandboxResult]:
        """Each program in its own sandbox, `workers` at a time (threads driving subprocesses)."""
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return list(pool.map(self.run, programs))


def _settings(limits: SandboxLimits, tier: str, verdict_fd: int) -> str:
    return json.dumps(
        {
            "verdict_fd": verdict_fd,
            "confine_mounts": tier == "namespaces",
            "block_sockets": tier != "namespaces",
            "tmpfs_bytes": limits.file_bytes,
            "cpu_s": limits.cpu_s,
            "memory_bytes": limits.memory_bytes,
            "file_bytes": limits.file_bytes,
            "processes": limits.processes,
        }
    )


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }


class _CappedReader(threading.Thread):
    """Reads a pipe to its end, keeping the first `cap` bytes; sets `overflow` past them."""

    def __init__(self, stream, cap: int, overflow: threading.Event):
        super().__init__(daemon=True)
        self.stream, self.cap, self.overflow = stream, cap, overflow
        self.kept = bytearray()

    def run(self) -> None:
        while chunk := self.stream.read1(1 << 16):
            room = self.cap - len(self.kept)
            self.kept += chunk[: max(room, 0)]
            if len(chunk) > room:
                self.overflow.set()
                break
        self.stream.close()

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


def _kill_uid(uid: int) -> None:
    """SIGKILL every process owned by `uid` until none is left (tier 2)."""
    for _ in range(100):
        found = False
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid == uid:
                    os.kill(int(entry.name), signal.SIGKILL)
                    found = True
            except (FileNotFoundError, ProcessLookupError):
                pass
        if not found:
            return
        time.sleep(0.01)


def _run(tier: str, program: str, limits: SandboxLimits) -> SandboxResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="fj-sandbox-")
    uid = _SANDBOX_UID_BASE + secrets.randbelow(1 << 20) if tier == "uid" else None
    read_verdict, write_verdict = os.pipe()
    try:
        Path(workdir, "program.py").write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", str(LAUNCHER), _settings(limits, tier, write_verdict)]
        if tier == "namespaces":
            unshare = _unshare_command()
            if unshare is None:
                return SandboxResult(
                    "unavailable", "no `unshare` on PATH", tier, "", "", time.monotonic() - start
                )
            command = unshare + command
        if uid is not None:
            os.chown(workdir, uid, uid)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_environment(workdir),
                pass_fds=(write_verdict,),
                start_new_session=True,
                **({"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}),
            )
        except (OSError, TypeError) as e:
            return SandboxResult(
                "unavailable", f"could not start: {e}", tier, "", "", time.monotonic() - start
            )
        os.close(write_verdict)
        write_verdict = -1
        nonce = secrets.token_hex(16)
        overflow = threading.Event()
        readers = [
            _CappedReader(proc.stdout, limits.output_bytes, overflow),
            _CappedReader(proc.stderr, limits.output_bytes, overflow),
        ]
        for reader in readers:
            reader.start()
        try:
            proc.stdin.write(f"{nonce}\n".encode())
            proc.stdin.close()
        except OSError:
            pass
        deadline = start + limits.wall_s
        while proc.poll() is None and not overflow.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        ran_out = proc.poll() is None
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
        proc.wait()
        for reader in readers:
            reader.join(timeout=1.0)
        verdict = _read_all(read_verdict)
        stdout, stderr = (reader.text() for reader in readers)
        seconds = time.monotonic() - start
        if "started" not in verdict.splitlines()[:1]:
            return SandboxResult(
                "unavailable",
                f"the sandbox did not start (exit {proc.returncode}): {stderr[-300:].strip()}",
                tier,
                stdout,
                stderr,
                seconds,
            )
        if overflow.is_set():
            reason = f"output over {limits.output_bytes} bytes"
        elif ran_out:
            reason = f"wall-clock limit of {limits.wall_s:g} s"
        elif proc.returncode == 0 and f"passed {nonce}" in verdict.splitlines():
            return SandboxResult("passed", "", tier, stdout, stderr, seconds)
        else:
            reason = (
                f"exit code {proc.returncode}"
                if proc.returncode >= 0
                else f"killed by signal {-proc.returncode}"
            )
        return SandboxResult("failed", reason, tier, stdout, stderr, seconds)
    finally:
        for fd in (read_verdict, write_verdict):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_all(fd: int) -> str:
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")
