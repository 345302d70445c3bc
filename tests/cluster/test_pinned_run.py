"""A local streaming run on pinned cores (``cluster.resources.core_layout``), seen from outside while it runs:
the generation actor alone on its core, its background weight fetch on the shared one, and every process of the
run at one niceness (``cluster/train.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _processes(root: psutil.Process, name: str) -> list[psutil.Process]:
    out = []
    for p in root.children(recursive=True):
        try:
            if name in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def _thread_cores(pid: int) -> dict[int, list[int]]:
    """Each thread of ``pid``: the cores it may run on."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(tid)] = sorted(os.sched_getaffinity(int(tid)))
        except (ProcessLookupError, FileNotFoundError):
            continue
    return out


@pytest.mark.skipif((os.cpu_count() or 1) < 2 or not hasattr(os, "sched_getaffinity"), reason="needs 2 cores, Linux")
def test_pinned_streaming_run_keeps_generation_alone_and_one_niceness(tmp_path):
    cores = sorted(os.sched_getaffinity(0))
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--set", "algorithm.max_staleness=1",
           "--set", "generation.num_actors=1", "--set", "learner.torch_threads=1", "--set", "train.steps=40",
           "--set", "train.eval_every=100000", "--set", "metrics.progress=false",
           "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"model.cache_dir={REPO / '.relay_cache'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_niceness"}
    log = (tmp_path / "console.txt").open("w")  # a file, not a pipe nobody reads while the run goes on
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    seen = None
    try:
        root = psutil.Process(proc.pid)
        deadline = time.monotonic() + 300
        while seen is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            metrics = tmp_path / "run" / "metrics.jsonl"
            if not metrics.exists() or metrics.read_text().count("system/step_seconds") < 5:
                continue  # a few steps in: weights were published and fetched in the background
            actors, learners = _processes(root, "ray::GenerationActor"), _processes(root, "ray::Learner")
            if len(actors) != 1 or len(learners) != 1:
                continue
            (actor,), (learner,) = actors, learners
            seen = {"actor": _thread_cores(actor.pid), "actor_main": sorted(actor.cpu_affinity()),
                    "nice": {"driver": root.nice(), "actor": actor.nice(), "learner": learner.nice()},
                    "learner": sorted(learner.cpu_affinity())}
    finally:
        try:
            proc.wait(timeout=300)  # the run ends by itself and stops its Ray
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = (tmp_path / "console.txt").read_text()
    assert proc.returncode == 0 and seen is not None, f"the run did not get 5 steps in; its output:\n{out[-3000:]}"
    own, shared = cores[-1:], cores[:-1]
    assert seen["actor_main"] == own and seen["learner"] == shared
    # the engine's threads on its own core; the background fetch's thread (it packs the weights) on the shared one
    assert own in seen["actor"].values() and shared in seen["actor"].values(), seen["actor"]
    # one niceness: Ray's default starts the workers 15 above the driver and its daemons
    assert len(set(seen["nice"].values())) == 1, seen["nice"]
