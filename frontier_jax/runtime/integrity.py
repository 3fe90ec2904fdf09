"""Checkpoint integrity: a checksum manifest per checkpoint step, its verification, and
`CheckpointError` (a checkpoint that cannot be written, verified or restored).

Once a step's save has committed (orbax renamed its temporary directory), process 0 writes

    <step>/checksums.json   {"format_version": 1, "algorithm": "sha256", "step": s,
                             "files": {"<path relative to <step>/>": {"bytes": n, "sha256": hex}}}

covering every file of the step: the train state (orbax's array files, metadata and sharding),
the run config and the data-iterator state.  A step verifies when every listed file exists
with its size and SHA-256 digest.  Its verdict is one of

    ok          every file matches the manifest
    corrupt     a listed file is missing, or its size or digest differs; the manifest does not
                read; or there is no manifest although an earlier step has one (the process died
                between the commit and the manifest)
    unverified  no manifest, and no earlier step has one: written before checkpoints were
                checksummed; restored with a warning

Files are hashed in parallel threads (hashlib releases the GIL), so a step costs its byte size
over the disk's or the cores' throughput, whichever is lower.  Every process that restores a
step verifies it itself (the same files, so the same verdict on every process).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os

from etils import epath

MANIFEST = "checksums.json"
FORMAT_VERSION = 1
ALGORITHM = "sha256"
OK, CORRUPT, UNVERIFIED = "ok", "corrupt", "unverified"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, does not restore, or does not match its checksums."""


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its type name when empty), at most `limit` characters."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[:limit] + " ..."


def raise_interruption(err: BaseException) -> None:
    """Re-raises the KeyboardInterrupt (Ctrl-C) or SystemExit that `err` wraps (orbax turns one
    raised inside a restore into an ordinary error), so that an interrupted restore is never taken
    for a corrupt checkpoint."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise err
        seen.add(id(err))
        err = err.__cause__ or err.__context__


@dataclasses.dataclass(frozen=True)
class Verdict:
    status: str  # OK | CORRUPT | UNVERIFIED
    detail: str = ""  # what is wrong (corrupt) or why it is not checked (unverified)
    reason: str = ""  # corrupt: a short tag for the moved-aside directory name

    def describe(self) -> str:
        return self.status if not self.detail else f"{self.status} ({self.detail})"


def _threads() -> int:
    return min(16, os.cpu_count() or 1)


def _step_files(step_dir: epath.Path) -> list[str]:
    """Paths (relative, '/'-separated, sorted) of every file under `step_dir` but the manifest."""
    return sorted(
        str((directory / name).relative_to(step_dir))
        for directory, _, names in step_dir.walk()
        for name in names
        if not (directory == step_dir and name.startswith(MANIFEST))
    )


def _sha256(path: epath.Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digests(step_dir: epath.Path, files: list[str]) -> dict[str, str]:
    with concurrent.futures.ThreadPoolExecutor(_threads()) as pool:
        return dict(zip(files, pool.map(lambda f: _sha256(step_dir / f), files)))


def write_manifest(step_dir: epath.PathLike, step: int) -> dict:
    """Hashes every file of the committed step directory and writes its checksums.json whole
    (a temporary file renamed over it); returns the manifest."""
    step_dir = epath.Path(step_dir)
    files = _step_files(step_dir)
    digests = _digests(step_dir, files)
    manifest = {
        "format_version": FORMAT_VERSION,
        "algorithm": ALGORITHM,
        "step": step,
        "files": {f: {"bytes": (step_dir / f).stat().length, ALGORITHM: digests[f]} for f in files},
    }
    temporary = step_dir / (MANIFEST + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    temporary.rename(step_dir / MANIFEST)
    return manifest


def step_directories(directory: epath.PathLike) -> dict[int, epath.Path]:
    """{step: directory} of the committed steps of an orbax checkpoint directory (names that are
    step numbers; temporaries and moved-aside steps are not steps)."""
    directory = epath.Path(directory)
    return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def _read_manifest(step_dir: epath.Path) -> dict:
    manifest = json.loads((step_dir / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("algorithm") != ALGORITHM:
        raise ValueError(
            f"format_version {manifest.get('format_version')!r}, algorithm {manifest.get('algorithm')!r}"
        )
    return manifest


def _file_problem(step_dir: epath.Path, name: str, listed: dict, digest: str | None) -> str | None:
    path = step_dir / name
    if not path.exists():
        return f"{name} is missing"
    size = path.stat().length
    if size != listed["bytes"]:
        return f"{name} has {size} bytes, {MANIFEST} says {listed['bytes']}"
    if digest is not None and digest != listed[ALGORITHM]:
        return f"{name} does not match its {ALGORITHM} in {MANIFEST} ({digest[:12]}... vs {listed[ALGORITHM][:12]}...)"
    return None


def verify_step(directory: epath.PathLike, step: int) -> Verdict:
    """The verdict of checkpoint `step` of the orbax checkpoint directory (see the module docstring)."""
    directory = epath.Path(directory)
    step_dir = directory / str(step)
    if not (step_dir / MANIFEST).exists():
        earlier = sorted(
            s for s, d in step_directories(directory).items() if s < step and (d / MANIFEST).exists()
        )
        if earlier:
            return Verdict(
                CORRUPT,
                f"no {MANIFEST}, although step {earlier[-1]} has one: the save did not complete",
                "missing-checksums",
            )
        return Verdict(UNVERIFIED, f"no {MANIFEST}: written before checkpoints were checksummed")
    try:
        files = _read_manifest(step_dir)["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        return Verdict(CORRUPT, f"{MANIFEST} does not read ({first_line(err, 120)})", "checksum")
    # sizes first (cheap: a truncated file is named without hashing anything), then digests
    problems = [p for name, listed in files.items() if (p := _file_problem(step_dir, name, listed, None))]
    if not problems:
        digests = _digests(step_dir, sorted(files))
        problems = [
            p for name in sorted(files) if (p := _file_problem(step_dir, name, files[name], digests[name]))
        ]
    if problems:
        more = f" (and {len(problems) - 1} more files)" if len(problems) > 1 else ""
        return Verdict(CORRUPT, problems[0] + more, "checksum")
    return Verdict(OK)


def verify_run(directory: epath.PathLike) -> dict[int, Verdict]:
    """{step: verdict} of every step of an orbax checkpoint directory, oldest first."""
    return {step: verify_step(directory, step) for step in sorted(step_directories(directory))}


def restorable_steps_hint(directory: epath.PathLike, bad_step: int) -> str:
    """What to load instead of the unusable `bad_step`: the other steps by verdict, newest first,
    and the directory of the newest that verifies (every other step is hashed: an error path)."""
    directory = epath.Path(directory)
    verdicts = {
        s: verify_step(directory, s)
        for s in sorted(step_directories(directory), reverse=True)
        if s != bad_step
    }
    by_status = {
        status: [s for s, v in verdicts.items() if v.status == status] for status in (OK, UNVERIFIED)
    }
    if by_status[OK]:
        return (
            f"steps whose checksums verify: {', '.join(map(str, by_status[OK]))}; "
            f"load {directory / str(by_status[OK][0])} instead"
        )
    if by_status[UNVERIFIED]:
        return (
            f"steps without checksums (not verified): {', '.join(map(str, by_status[UNVERIFIED]))}; "
            f"try {directory / str(by_status[UNVERIFIED][0])}"
        )
    return "no other step of the run verifies" if verdicts else "the run has no other step"
