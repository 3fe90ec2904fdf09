"""The sandbox: each hostile program ends as a failed sample within its limit, and the caller, the
file system outside the sample's directory and other samples are untouched; the verdict passes only
when the harness saw the tests finish; a sandbox that cannot start is `unavailable`."""

import os
import secrets
import shutil
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from frontier_jax.posttrain import sandbox as sandbox_module
from frontier_jax.posttrain.code_reward import CodeReward
from frontier_jax.posttrain.sandbox import Sandbox, SandboxLimits, sandbox_tier

LIMITS = SandboxLimits(
    wall_s=3.0, cpu_s=1, memory_bytes=512 << 20, file_bytes=1 << 20, processes=16, output_bytes=4096
)
# Seconds a killed sample may take past its wall clock to be torn down: on a loaded 2-core CI machine
# the kill, the wait and the output readers' join of a fork bomb took 1.8 s (2026-12-07). A process
# left running is caught by `_alive_with`, not by this bound.
TEARDOWN_S = 6.0


def expected_tier() -> str:
    """Re-derived independently: user namespaces if `unshare` runs a process in them, else root's
    uid tier, else unconfined."""
    unshare = shutil.which("unshare")
    if (
        unshare
        and subprocess.run([unshare, "-Urnpf", "--mount-proc", "true"], capture_output=True).returncode == 0
    ):
        return "namespaces"
    return "uid" if os.geteuid() == 0 else "unconfined"


@pytest.fixture(scope="module")
def box():
    tier = sandbox_tier()
    assert tier == expected_tier()
    return Sandbox(LIMITS, unconfined=True)


def _alive_with(token: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_a_program_whose_tests_pass_passes_and_one_whose_assertion_fails_fails(box):
    good, bad = box.run_many(["def f(x):\n    return 2 * x\nassert f(21) == 42\n", "assert 1 == 2\n"])
    assert good.passed and good.tier == box.tier, good
    assert bad.status == "failed" and "AssertionError" in bad.stderr


@pytest.mark.parametrize(
    "program, limit",
    [
        ("while True:\n    pass\n", "cpu"),
        ("blocks = [bytearray(64 << 20) for _ in range(64)]\n", "memory"),
        ("import sys\nsys.stdout.write('x' * 100_000_000)\n", "output"),
        ("import sys\nsys.exit(0)\nassert False\n", "early exit"),
        ("import os\nos._exit(0)\nassert False\n", "early exit"),
    ],
    ids=["infinite-loop", "memory-bomb", "100MB-output", "sys-exit-0", "os-_exit-0"],
)
def test_hostile_program_fails_within_its_limit(box, program, limit):
    result = box.run(program)
    assert result.status == "failed", result
    assert result.seconds < LIMITS.wall_s + TEARDOWN_S
    assert len(result.stdout) <= LIMITS.output_bytes and len(result.stderr) <= LIMITS.output_bytes


def test_fork_bomb_and_escaped_sessions_are_killed(box):
    """The bomb's first child starts a new session (escaping killpg) and sleeps; after the sample
    fails at the wall clock no process carrying its token is left."""
    token = f"fj-bomb-{secrets.token_hex(6)}"
    program = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{token}"])
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """)
    result = box.run(program)
    assert result.status == "failed" and result.seconds < LIMITS.wall_s + TEARDOWN_S, result
    assert _alive_with(token) == []


def test_no_network_connection_to_the_caller(box):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        result = box.run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')\n"
        )
        assert result.status == "failed", result
        with pytest.raises(TimeoutError):
            server.accept()


def test_writes_outside_its_directory_fail_and_leave_nothing(box, tmp_path):
    targets = [tmp_path / "outside.txt", Path("/tmp") / f"fj-outside-{secrets.token_hex(6)}"]
    program = "".join(f"open({str(t)!r}, 'w').write('x')\n" for t in targets)
    result = box.run(program)
    assert result.status == "failed", result
    assert not any(t.exists() for t in targets)


def test_killing_its_parent_leaves_the_caller_and_other_samples_alive(box):
    killer = f"import os, signal\nfor pid in (os.getppid(), {os.getpid()}, -1):\n    try:\n        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\nassert False\n"
    killed, other = box.run_many([killer, "import time\ntime.sleep(0.5)\nassert sum(range(4)) == 6\n"])
    assert killed.status == "failed" and other.passed, (killed, other)


def test_the_callers_environment_is_not_readable(box, monkeypatch):
    secret = secrets.token_hex(12)
    monkeypatch.setenv("FJ_SANDBOX_SECRET", secret)
    program = textwrap.dedent(f"""
        import os
        seen = str(dict(os.environ))
        for pid in ({os.getpid()}, {os.getppid()}, 1, os.getppid()):
            try:
                seen += open(f"/proc/{{pid}}/environ", "rb").read().decode(errors="replace")
            except OSError:
                pass
        print(seen)
        assert "FJ_SANDBOX_SECRET" in seen
        """)
    result = box.run(program)
    assert result.status == "failed", result
    assert secret not in result.stdout + result.stderr


def test_a_fake_passed_verdict_fails(box):
    """`passed` on stdout and on every low file descriptor (the verdict pipe among them), then a
    clean exit: the harness never saw the tests finish."""
    program = "import os\nprint('passed')\nfor fd in range(3, 16):\n    try:\n        os.write(fd, b'started\\npassed ' + b'0' * 32 + b'\\n')\n    except OSError:\n        pass\nos._exit(0)\nassert False\n"
    result = box.run(program)
    assert result.status == "failed", result


def test_a_sandbox_that_cannot_start_is_unavailable_and_scores_none(monkeypatch):
    """unshare refusing to start (here `false` in its place) gives `unavailable`; the code reward
    maps it to None, not 0."""
    monkeypatch.setattr(sandbox_module, "_unshare_command", lambda: [shutil.which("false")])
    box = Sandbox(LIMITS, tier="namespaces")
    assert box.run("assert True\n").status == "unavailable"
    assert CodeReward(box)(["p"], ["x = 1"], tests=["assert x == 1"]) == [None]
    monkeypatch.setattr(sandbox_module, "_unshare_command", lambda: None)  # no unshare at all
    assert box.run("assert True\n").status == "unavailable"


def test_code_without_a_confining_tier_is_refused_unless_allowed(monkeypatch, tmp_path, capsys):
    """Where only the unconfined tier exists, `code` is a one-line configuration error (exit 2)
    unless --unconfined-sandbox; allowed, it runs with rlimits and blocked sockets."""
    from frontier_jax.cli import EXIT_USAGE, main

    monkeypatch.setattr(sandbox_module, "sandbox_tier", lambda: "unconfined")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "p", "completion": "x = 1", "tests": "assert x == 1"}\n')
    command = [
        "rewards",
        "score",
        "--rewards",
        "code",
        "--in",
        str(rows),
        "--out",
        str(tmp_path / "out.jsonl"),
    ]
    assert main(command) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rewards.unconfined_sandbox=true" in err[0]
    assert main(command + ["--unconfined-sandbox"]) == 0
    assert '"code": 1.0' in (tmp_path / "out.jsonl").read_text()
    blocked = Sandbox(LIMITS, unconfined=True).run("import socket\nsocket.socket()\n")
    assert blocked.status == "failed" and "network access is disabled" in blocked.stderr
