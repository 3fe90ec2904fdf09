"""The README's shell commands as data: every command of its ```bash blocks, and a way to run one
as written.

A block's lines are read as a shell reads them: continuation lines joined, `# comments` dropped,
`cmd1 && cmd2` (or `;`) two commands, leading `VAR=value` words the command's environment. A
command runs with bash in a directory that stands for the repository root: the top-level entries
of the repository that its words read (configs/, launch/, .ci/ ...) are linked there, and so are
the placeholders the caller supplies (`runs/toy`, `held_out.jsonl` ...).

Used by tests/test_readme_commands.py (every command) and tests/train/test_cli_demo.py (the
README's main command at its full length).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# a ```bash (sh, shell) block, also one indented inside a list item
SHELL_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```(?:bash|sh|shell)[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M
)
ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=")  # a leading VAR=value word
COMMAND_SEPARATORS = ("&&", ";")
# their values are written, never read
OUTPUT_OPTIONS = ("--run-dir", "--out", "--expert-stats", "--pairs-out")


@dataclass(frozen=True)
class Command:
    """One command of a README shell block."""

    line: int  # the README line it starts on
    words: tuple[str, ...]  # shell words as written, the leading VAR=value assignments included

    @property
    def env(self) -> dict[str, str]:
        """The leading VAR=value assignments."""
        return dict(w.split("=", 1) for w in self.words[: self._n_assignments])

    @property
    def argv(self) -> tuple[str, ...]:
        """The words after the assignments: the program and its arguments."""
        return self.words[self._n_assignments :]

    @property
    def _n_assignments(self) -> int:
        n = 0
        while n < len(self.words) and ASSIGNMENT.match(self.words[n]):
            n += 1
        return n

    @property
    def program(self) -> tuple[str, ...]:
        """argv with `python -m frontier_jax` spelt as its console script `frontier-jax`."""
        if self.argv[:3] == ("python", "-m", "frontier_jax"):
            return ("frontier-jax", *self.argv[3:])
        return self.argv

    def option(self, flag: str) -> str | None:
        """The value after `flag` (the last one if repeated), None without it."""
        values = [self.argv[i + 1] for i, w in enumerate(self.argv[:-1]) if w == flag]
        return values[-1] if values else None

    @property
    def outputs(self) -> set[str]:
        """The paths the command writes: the values of OUTPUT_OPTIONS."""
        return {self.argv[i + 1] for i, w in enumerate(self.argv[:-1]) if w in OUTPUT_OPTIONS}

    @property
    def text(self) -> str:
        return shlex.join(self.words)

    def __str__(self) -> str:
        return f"README.md:{self.line}: {self.text}"


def readme_commands(text: str | None = None) -> list[Command]:
    """Every command of the README's (or `text`'s) bash blocks, in order."""
    text = README.read_text() if text is None else text
    commands = []
    for block in SHELL_BLOCK.finditer(text):
        first = text.count("\n", 0, block.start("body")) + 1
        lines = [line.removeprefix(block["indent"]) for line in block["body"].splitlines()]
        i = 0
        while i < len(lines):
            start, logical = i, lines[i]
            while logical.endswith("\\") and i + 1 < len(lines):
                i += 1
                logical = logical[:-1] + " " + lines[i]
            i += 1
            lexer = shlex.shlex(logical, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words: list[str] = []
            for word in [*lexer, COMMAND_SEPARATORS[0]]:
                if word in COMMAND_SEPARATORS:
                    if words:
                        commands.append(Command(first + start, tuple(words)))
                    words = []
                else:
                    words.append(word)
    return commands


def main_command() -> Command:
    """The README's first training command: the demo of its first lines."""
    return next(c for c in readme_commands() if c.program[:2] == ("frontier-jax", "train"))


def placeholder_pattern(name: str) -> re.Pattern:
    """`name` as a whole path inside a word: runs/toy in `checkpoint=runs/toy,max_length=128` or
    `runs/toy/checkpoints`, not in `runs/toy-prepared`."""
    return re.compile(rf"(?<![\w./-]){re.escape(name)}(?![\w.-])")


def inputs_of(command: Command, names) -> list[str]:
    """The names (placeholders) that the command's words read (its outputs excluded)."""
    read = [w for i, w in enumerate(command.argv) if not (i and command.argv[i - 1] in OUTPUT_OPTIONS)]
    return [n for n in names if any(placeholder_pattern(n).search(w) for w in read)]


@cache
def _tracked_top_level() -> frozenset[str]:
    """The top-level names of the repository's tracked files (configs, launch, .ci, ...)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return frozenset(line.split("/", 1)[0] for line in files.stdout.splitlines())


def prepare_directory(
    command: Command, cwd: Path, placeholders: Mapping[str, Callable[[], Path]] | None = None
) -> None:
    """Makes `cwd` stand for the repository root for `command`: links the placeholders its words
    read (`placeholders`: name -> a function making the path) and the repository's top-level
    entries its relative paths start with (links already there are kept)."""
    placeholders = placeholders or {}
    for name in inputs_of(command, placeholders):
        link = cwd / name
        if not link.is_symlink():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(placeholders[name]().resolve())
    read = {w for w in command.argv if w not in command.outputs}
    for top in sorted({w.split("/", 1)[0] for w in read if "/" in w} & _tracked_top_level()):
        if not (cwd / top).is_symlink():
            (cwd / top).symlink_to(REPO / top)


def run_command(
    command: Command,
    cwd: Path,
    env: Mapping[str, str],
    append: tuple[str, ...] = (),
    placeholders: Mapping[str, Callable[[], Path]] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """Runs `command` with bash in `cwd` (prepare_directory first): its words as written plus
    `append`, its assignments added to `env` (XLA_FLAGS after env's flags, which tests use for
    faster compiles only), this interpreter's bin directory first on PATH (frontier-jax, python)."""
    prepare_directory(command, cwd, placeholders)
    full = dict(env)
    for key, value in command.env.items():
        full[key] = f"{env[key]} {value}".strip() if key == "XLA_FLAGS" and key in env else value
    full["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return subprocess.run(
        ["bash", "-c", shlex.join(command.argv + tuple(append))],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
