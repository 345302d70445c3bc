"""cluster/checkpoint.py on a real filesystem: atomic commits, failed writes that lose nothing, ordering,
pruning, the run-directory lock and the writability check. No Ray, no torch: ``save`` callbacks write
plain files where the learner would write its weights and state."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster import checkpoint
from cluster.checkpoint import CheckpointError, RunDirLock

REPO = Path(__file__).resolve().parents[2]


def _writes(files: dict[str, str]):
    """A ``save`` callback that writes ``files`` (relative path -> text) into the staging directory."""
    def save(staging: Path) -> None:
        for rel, text in files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)
    return save


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _leftovers(run_dir: Path) -> list[str]:
    """Hidden entries under checkpoints/ (staging or set-aside directories)."""
    return sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).iterdir() if p.name.startswith("."))


def _checkpoint(run_dir: Path, name: str, step: int, files: dict[str, str] | None = None) -> Path:
    return checkpoint.write(run_dir, name, _writes(files or {"model.safetensors": f"{name}"}), {"step": step})


# ---- write and commit -------------------------------------------------------------------------


def test_write_commits_every_file_and_leaves_no_staging(tmp_path):
    files = {"model.safetensors": "weights", "trainer_state.pt": "state", "critic/config.json": "{}"}
    path = checkpoint.write(tmp_path, "step_2", _writes(files), {"step": 2, "version": 2})
    assert path == checkpoint.checkpoints_dir(tmp_path) / "step_2"
    assert _tree(path) == {**{k: v.encode() for k, v in files.items()},
                           "driver_state.json": b'{"step": 2, "version": 2}\n'}
    assert checkpoint.read_state(path) == {"step": 2, "version": 2}
    assert _leftovers(tmp_path) == []
    assert checkpoint.latest(tmp_path) == path


@pytest.mark.parametrize(("code", "reason"), [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied")],
                         ids=["ENOSPC", "EACCES"])
def test_failed_write_says_why_and_keeps_the_previous_checkpoint(tmp_path, code, reason):
    previous = _checkpoint(tmp_path, "step_1", 1, {"model.safetensors": "good weights", "trainer_state.pt": "s1"})
    before = _tree(previous)

    def save(staging: Path) -> None:  # half the files, then the disk fills (or permission goes)
        (staging / "model.safetensors").write_text("half of the new weights")
        raise OSError(code, os.strerror(code), str(staging / "trainer_state.pt"))

    with pytest.raises(CheckpointError) as caught:
        checkpoint.write(tmp_path, "step_2", save, {"step": 2}, previous=previous)
    message = str(caught.value)
    assert reason in message, message
    assert str(previous) in message and "is intact" in message, message
    assert f"relay train --resume {tmp_path}" in message, message
    assert "trainer_state.pt" in message, message  # the file the error was about
    assert _leftovers(tmp_path) == []
    assert _tree(previous) == before
    assert checkpoint.latest(tmp_path) == previous


def test_failed_first_write_says_there_is_no_previous_checkpoint(tmp_path):
    def save(staging: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"the disk is full\. The previous checkpoint \(none yet\)"):
        checkpoint.write(tmp_path, "step_1", save, {"step": 1})
    assert _leftovers(tmp_path) == [] and checkpoint.latest(tmp_path) is None


def test_other_errors_in_save_pass_through_and_clean_up(tmp_path):
    def save(staging: Path) -> None:
        (staging / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write(tmp_path, "step_1", save, {"step": 1})
    assert _leftovers(tmp_path) == [] and checkpoint.complete(tmp_path) == []


def test_a_crashed_write_is_never_picked_up(tmp_path):
    good = _checkpoint(tmp_path, "step_1", 1)
    crashed = checkpoint.checkpoints_dir(tmp_path) / ".staging-step_2"  # a run killed while writing step 2
    crashed.mkdir()
    (crashed / "model.safetensors").write_text("half")
    (crashed / "trainer_state.pt").write_text("half")
    unfinished = checkpoint.checkpoints_dir(tmp_path) / "step_3"  # no driver_state.json: not complete either
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_text("half")
    assert checkpoint.complete(tmp_path) == [(1, good)]
    assert checkpoint.latest(tmp_path) == good
    again = _checkpoint(tmp_path, "step_2", 2)  # the resumed run writes step 2 over the leftover
    assert checkpoint.latest(tmp_path) == again and _leftovers(tmp_path) == []
    assert _tree(again) == {"model.safetensors": b"step_2", "driver_state.json": b'{"step": 2}\n'}


def test_rewriting_final_replaces_it(tmp_path):
    _checkpoint(tmp_path, "final", 4, {"model.safetensors": "first run", "only_in_first.txt": "x"})
    final = _checkpoint(tmp_path, "final", 6, {"model.safetensors": "resumed run"})
    assert _tree(final) == {"model.safetensors": b"resumed run", "driver_state.json": b'{"step": 6}\n'}
    assert _leftovers(tmp_path) == []  # no .old-final
    assert checkpoint.complete(tmp_path) == [(6, final)]


def test_unreadable_driver_state_names_the_file(tmp_path):
    path = _checkpoint(tmp_path, "step_1", 1)
    (path / "driver_state.json").write_text(json.dumps({"version": 1}))
    with pytest.raises(CheckpointError, match=r"step_1/driver_state\.json is unreadable .*move that checkpoint aside"):
        checkpoint.latest(tmp_path)


# ---- order and pruning -------------------------------------------------------------------------


def test_latest_orders_by_step_not_by_name(tmp_path):
    assert checkpoint.latest(tmp_path) is None and checkpoint.complete(tmp_path) == []
    step_10 = _checkpoint(tmp_path, "step_10", 10)
    step_9 = _checkpoint(tmp_path, "step_9", 9)
    assert checkpoint.latest(tmp_path) == step_10
    final = _checkpoint(tmp_path, "final", 10)
    assert checkpoint.complete(tmp_path) == [(9, step_9), (10, step_10), (10, final)]
    assert checkpoint.latest(tmp_path) == final


def test_prune_keeps_the_newest_steps_final_and_protected(tmp_path):
    steps = {n: _checkpoint(tmp_path, f"step_{n}", n) for n in (2, 4, 6, 8, 10)}
    final = _checkpoint(tmp_path, "final", 10)
    gone = checkpoint.prune(tmp_path, keep_last=2, protect=steps[2])
    assert gone == [steps[4], steps[6]]
    assert [p for _, p in checkpoint.complete(tmp_path)] == [steps[2], steps[8], steps[10], final]
    assert checkpoint.prune(tmp_path, keep_last=1) == [steps[2], steps[8]]
    assert [p for _, p in checkpoint.complete(tmp_path)] == [steps[10], final]
    assert checkpoint.prune(tmp_path, keep_last=1) == []  # final is never a step to prune


def test_prune_matches_protect_given_as_another_spelling(tmp_path, monkeypatch):
    steps = [_checkpoint(tmp_path, f"step_{n}", n) for n in (1, 2, 3)]
    monkeypatch.chdir(tmp_path)
    assert checkpoint.prune(tmp_path, keep_last=1, protect="checkpoints/step_1") == [steps[1]]


# ---- the run-directory lock ----------------------------------------------------------------------


HOLD_LOCK = """
import os, sys
from cluster.checkpoint import RunDirLock
lock = RunDirLock(sys.argv[1])  # kept: the lock goes with the open file
lock.acquire()
print(os.getpid(), flush=True)
sys.stdin.read()  # hold it until the test closes stdin or kills this process
"""


@pytest.fixture
def holder():
    """Starts a process that holds the lock on a run directory; returns once the lock is held."""
    procs = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.strip() == str(proc.pid), f"the lock holder did not start: {line!r}"
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.mark.parametrize("how", ["exit", "SIGKILL"])
def test_lock_refuses_a_second_process_until_the_holder_is_gone(tmp_path, holder, how):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    with pytest.raises(CheckpointError) as caught:
        RunDirLock(run_dir).acquire()
    message = str(caught.value)
    assert f"(pid {proc.pid})" in message and "in use" in message and str(run_dir) in message, message
    if how == "exit":
        proc.stdin.close()
    else:
        os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == (0 if how == "exit" else -signal.SIGKILL)
    lock = RunDirLock(run_dir)
    lock.acquire()
    assert (run_dir / ".lock").read_text() == str(os.getpid())
    lock.release()


def test_lock_is_released_and_taken_again_in_one_process(tmp_path):
    lock = RunDirLock(tmp_path / "new" / "run")  # the directory is created
    lock.acquire()
    lock.release()
    lock.release()  # a second release is harmless
    again = RunDirLock(tmp_path / "new" / "run")
    again.acquire()
    with pytest.raises(CheckpointError, match="is in use"):  # flock: a second open file is refused too
        RunDirLock(tmp_path / "new" / "run").acquire()
    again.release()


def test_move_aside_keeps_the_earlier_run_and_holds_the_directory_again(tmp_path):
    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)
    lock.acquire()
    (run_dir / "config.json").write_text("{}\n")
    first = checkpoint.move_aside(run_dir, lock)
    assert first.name.startswith("run-") and (first / "config.json").read_text() == "{}\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # empty but for the lock, held again
    with pytest.raises(CheckpointError, match="is in use"):
        RunDirLock(run_dir).acquire()
    (run_dir / "config.json").write_text("{}\n")
    os.utime(run_dir / "config.json", ((first / "config.json").stat().st_mtime,) * 2)  # same stamp: name taken
    second = checkpoint.move_aside(run_dir, lock)
    assert second.name == f"{first.name}.1"
    lock.release()


@pytest.mark.parametrize("earlier", ["checkpoint", "metrics only", "config only", "nothing"])
def test_a_new_run_sets_an_earlier_run_aside_even_without_a_checkpoint(tmp_path, earlier):
    """A run killed before its first checkpoint left its metrics: a new run in that directory must not append to
    them (they would read as one run), so it is moved aside too, said to be not resumable."""
    from cluster.train import set_aside_earlier_run

    run_dir = tmp_path / "run"
    lock = RunDirLock(run_dir)
    lock.acquire()
    (run_dir / "relay.yaml").write_text("train: {}\n")  # a user's own file there is not a run
    if earlier in ("checkpoint", "config only"):
        (run_dir / "config.json").write_text("{}\n")
    if earlier in ("checkpoint", "metrics only"):
        (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    if earlier == "checkpoint":
        checkpoint.write(run_dir, "step_5", lambda staging: None, {"step": 5})
    lines = []
    moved = set_aside_earlier_run(run_dir, lock, lines.append)
    lock.release()
    if earlier == "nothing":
        assert moved is None and lines == [] and sorted(p.name for p in run_dir.iterdir()) == [".lock", "relay.yaml"]
        return
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"] and (moved / "relay.yaml").exists()
    want = f"continue that one with relay train --resume {moved}" if earlier == "checkpoint" else \
        "it wrote no checkpoint, so it cannot be resumed"
    assert lines == [f"train.run_dir {run_dir} held an earlier run; moved it to {moved} ({want})"]


# ---- check_writable ----------------------------------------------------------------------------


def test_check_writable_creates_a_missing_directory(tmp_path):
    checkpoint.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir() and list((tmp_path / "a" / "b").iterdir()) == []


def test_check_writable_refuses_a_file(tmp_path):
    (tmp_path / "run").write_text("notes")
    with pytest.raises(CheckpointError, match="is a file; point it at a directory"):
        checkpoint.check_writable(tmp_path / "run")
    assert (tmp_path / "run").read_text() == "notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_check_writable_refuses_a_read_only_directory(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match=r"is not writable \(Permission denied\); choose a directory"):
            checkpoint.check_writable(run_dir)
    finally:
        run_dir.chmod(0o700)


def test_checkpoint_of_another_model_size_is_refused(tmp_path):
    from cluster.driver import RunError
    from cluster.train import check_same_model

    ckpt, reference = tmp_path / "ckpt", tmp_path / "ref"
    for path, hidden in ((ckpt, 128), (reference, 256)):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": hidden,
                                                      "num_hidden_layers": 4, "vocab_size": 260}))
    with pytest.raises(RunError, match=r"another model .*hidden_size 128 vs 256"):
        check_same_model(ckpt, str(reference))
    (reference / "config.json").write_text((ckpt / "config.json").read_text())
    check_same_model(ckpt, str(reference))  # the same sizes resume
