"""Checkpoints on disk: complete or absent, never half-written, and pruned.

Layout under ``run_dir/checkpoints/``: ``step_<N>/`` and ``final/``, each a Hugging Face policy
directory (``config.json``, ``model.safetensors``, tokenizer) plus the learner's
``trainer_state.pt`` and the driver's ``driver_state.json``. A checkpoint is written into
``.staging-<name>`` beside them, every file and directory is fsynced, and only then is it renamed
into place (rename is atomic on POSIX), so a reader sees the old checkpoint or the new one.
``driver_state.json`` is written last and a directory without it is never picked up. The learner
and the driver must see the same filesystem (one node, or shared storage on a cluster).

``run_dir/.lock`` holds an exclusive ``flock`` while a driver runs, so a second job cannot write
into the same run directory; the kernel releases it when the process dies, even by SIGKILL.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

DRIVER_STATE = "driver_state.json"
STAGING = ".staging-"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what to do."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: str | Path, name: str) -> Path:
    """An empty directory to write checkpoint ``name`` into before ``commit``."""
    path = checkpoints_dir(run_dir) / f"{STAGING}{name}"
    shutil.rmtree(path, ignore_errors=True)  # left by a run that died while writing
    path.mkdir(parents=True)
    return path


def commit(staging: Path, driver_state: dict) -> Path:
    """Write ``driver_state`` into ``staging``, fsync everything, and rename it to its final name."""
    (staging / DRIVER_STATE).write_text(json.dumps(driver_state) + "\n")
    for root, _, files in os.walk(staging):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))
    final = staging.with_name(staging.name.removeprefix(STAGING))
    old = final.with_name(f".old-{final.name}")
    if final.exists():  # "final" is rewritten by a resumed run that finishes again
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    staging.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write(run_dir: str | Path, name: str, save, driver_state: dict, previous: Path | None = None) -> Path:
    """Checkpoint ``name``: ``save(staging_dir)`` writes the learner's part, then ``commit``. On any failure the
    staging directory is removed, the previous checkpoint is left as it was, and the error says why."""
    staging = None
    try:
        staging = staging_dir(run_dir, name)
        save(staging)
        return commit(staging, driver_state)
    except OSError as e:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else \
            "permission denied" if e.errno == errno.EACCES else (e.strerror or str(e))
        raise CheckpointError(f"writing checkpoint {name} under {checkpoints_dir(run_dir)} failed: {reason}"
                              f"{f' ({e.filename})' if e.filename else ''}. The previous checkpoint "
                              f"({previous or 'none yet'}) is intact; free space or fix permissions, then continue "
                              f"with: relay train --resume {run_dir}") from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every complete checkpoint of ``run_dir`` as ``(step, path)``, oldest first (``final`` after a step
    checkpoint of the same step)."""
    found = []
    root = checkpoints_dir(run_dir)
    for path in root.iterdir() if root.is_dir() else ():
        if path.name.startswith(".") or not (path / DRIVER_STATE).is_file():
            continue
        try:
            step = int(json.loads((path / DRIVER_STATE).read_text())["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / DRIVER_STATE} is unreadable ({e}); move that checkpoint aside") from e
        found.append((step, path))
    return sorted(found, key=lambda sp: (sp[0], sp[1].name == "final"))


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete(run_dir)
    return found[-1][1] if found else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / DRIVER_STATE).read_text())


def prune(run_dir: str | Path, keep_last: int, protect: str | Path | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints (``final`` stays, and so does ``protect``: the
    checkpoint a resumed run's actors restart from); returns what went."""
    keep = Path(protect).resolve() if protect else None
    steps = [path for _, path in complete(run_dir) if path.name.startswith("step_")]
    gone = [path for path in steps[:-keep_last] if path.resolve() != keep]
    for path in gone:
        shutil.rmtree(path)
    return gone


class RunDirLock:
    """An exclusive lock on a run directory for the life of this process (module docstring)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if not isinstance(e, BlockingIOError):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise CheckpointError(f"run directory {str(self.path.parent)!r} is in use by another relay process "
                                  f"(pid {holder}); wait for it, stop it, or set another train.run_dir") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def check_writable(run_dir: str | Path) -> None:
    """Fail before any work when ``run_dir`` cannot hold a run."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"train.run_dir {str(path)!r} is a file; point it at a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"train.run_dir {str(path)!r} is not writable ({e.strerror}); "
                              "choose a directory you can write to") from e


def move_aside(run_dir: Path, lock: RunDirLock) -> Path:
    """Move the earlier run in ``run_dir``, which ``lock`` holds, to ``<name>-<its config's time>`` (``.1``, ``.2``
    ... if taken), and hold ``run_dir`` again, empty; returns the new path."""
    lock.release()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime((run_dir / "config.json").stat().st_mtime)) \
        if (run_dir / "config.json").exists() else time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}-{stamp}")
    n = 1
    while target.exists():
        target, n = run_dir.with_name(f"{run_dir.name}-{stamp}.{n}"), n + 1
    run_dir.rename(target)
    check_writable(run_dir)
    lock.acquire()
    return target
