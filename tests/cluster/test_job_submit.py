"""`ray job submit` of `relay train` to a real head node, the way users run it (deploy/job_submit.sh).

A head started with `ray start --head --block` in its own process group (so teardown stops this
head and nothing else: `ray stop` would stop every Ray on the machine, other users' included) with
token authentication on, as Ray 2.60 does by default. The working directory is the repository:
`.venv` and `.relay_cache` stay out of the upload through `.gitignore`, which Ray's packaging
honours; the excludes below repeat what deploy/job_submit.sh sends. The job finds the cached SFT
policy by absolute path and its `relay` console script on the head's PATH (the venv's).

Subprocesses only: a Ray session initialised in this pytest process by other tests is another
cluster and is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".relay_cache"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
EXCLUDES = [".venv", ".git", "runs", ".relay_cache", "**/__pycache__", "*.pt", "*.safetensors"]
TINY = ["train.steps=4", "train.eval_every=2", "sft.steps=30", "train.eval_prompts=50", "train.prompts_per_step=16",
        "metrics.progress=false", "reward.http_enabled=false", f"model.cache_dir={CACHE}"]
JOB_TIMEOUT_S = 420

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=f"no ray CLI beside {sys.executable}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict[str, str]:
    """The venv first on PATH (the job's `relay` resolves there) and token auth for the job API."""
    env = dict(os.environ, RAY_AUTH_MODE="token", PATH=os.pathsep.join([str(VENV_BIN), os.environ.get("PATH", "")]))
    env.pop("RAY_ADDRESS", None)  # never aim at someone else's cluster
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A 4-CPU head on free ports; yields the job API address."""
    work = tmp_path_factory.mktemp("ray_head")
    ports = {flag: free_port() for flag in (
        "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
        "--node-manager-port", "--object-manager-port")}
    address = f"http://127.0.0.1:{ports['--dashboard-port']}"
    log = (work / "ray_start.log").open("w")
    # A short temp dir: Ray's socket paths must stay under the Unix limit of 107 bytes.
    temp_dir = Path("/tmp") / f"relay_head_{os.getpid()}"
    cmd = [str(RAY), "start", "--head", "--block", "--num-cpus=4", "--num-gpus=0", "--dashboard-host=127.0.0.1",
           "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           *(f"{flag}={port}" for flag, port in ports.items())]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"ray start exited {proc.returncode}: {(work / 'ray_start.log').read_text()}"
            try:
                if requests.get(f"{address}/api/version", timeout=2).status_code in (200, 401, 403):
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"head not up in 120 s: {(work / 'ray_start.log').read_text()}"
            time.sleep(1)
        yield address
    finally:
        # --block makes `ray start` stop the head's processes on SIGTERM; the process group is the backstop.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=cli_env(), capture_output=True, text=True, timeout=timeout)


def submit(address: str, run_dir: Path, *overrides: str, resume: bool = False) -> str:
    """Submit `relay train` (with --resume) without waiting; returns the submission id."""
    job_id = f"relay_test_{os.getpid()}_{time.monotonic_ns()}"
    sets = [arg for o in (*TINY, f"train.run_dir={run_dir}", *overrides) for arg in ("--set", o)]
    out = ray_cli("job", "submit", "--address", address, "--no-wait", "--submission-id", job_id,
                  "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"excludes": EXCLUDES}),
                  "--", "relay", "train", *(["--resume"] if resume else []), *sets)
    assert out.returncode == 0, f"submit failed:\n{out.stdout}\n{out.stderr}"
    return job_id


def job_state(address: str, job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED, as `ray job status` words it."""
    out = ray_cli("job", "status", "--address", address, job_id)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for state, phrase in (("SUCCEEDED", f"Job '{job_id}' succeeded"), ("FAILED", f"Job '{job_id}' failed"),
                          ("STOPPED", f"Job '{job_id}' was stopped")):
        if phrase in text:
            return state
    match = re.search(rf"Status for job '{job_id}': (\w+)", text)
    assert match, text
    return match.group(1)


def wait_for_end(address: str, job_id: str, timeout: float) -> str:
    """Poll `ray job status` until a terminal state; returns it (stops the job on timeout)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(address, job_id)
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            return state
        time.sleep(2)
    ray_cli("job", "stop", "--address", address, job_id)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s:\n{job_logs(address, job_id)[-4000:]}")


def job_logs(address: str, job_id: str) -> str:
    out = ray_cli("job", "logs", "--address", address, job_id)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_stopped_job_continues_when_resubmitted_with_resume(head, tmp_path):
    """The way a preempted or stopped job goes on: `ray job stop` (SIGTERM, then SIGKILL after Ray's 3 s grace;
    either way a periodic checkpoint is there), then the same submission with `relay train --resume`.

    The job runs about half a second a step here, and only the last two step checkpoints stay on disk, so the test
    watches for any step checkpoint (cheaply, every 0.2 s) and asks Ray for the job's state only every few seconds
    (each `ray job status` takes seconds); the 40 steps leave it time to stop the job before it ends."""
    total = 40
    run, steps = tmp_path / "run", (f"train.steps={total}", "checkpoint.every=4", "checkpoint.every_s=null")
    first = submit(head, run, *steps)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    asked = 0.0
    while not list((run / "checkpoints").glob("step_*/driver_state.json")):
        assert time.monotonic() < deadline, job_logs(head, first)[-4000:]
        if time.monotonic() - asked > 5:
            assert job_state(head, first) in ("PENDING", "RUNNING"), job_logs(head, first)[-4000:]
            asked = time.monotonic()
        time.sleep(0.2)
    stopped = ray_cli("job", "stop", "--address", head, first)
    assert stopped.returncode == 0, stopped.stderr
    assert wait_for_end(head, first, 120) == "STOPPED"
    assert not (run / "summary.json").exists()

    started = time.monotonic()
    second = submit(head, run, *steps, resume=True)
    state = wait_for_end(head, second, JOB_TIMEOUT_S)
    logs = job_logs(head, second)
    print(f"\njob {second}: {state} after {time.monotonic() - started:.1f} s")
    assert state == "SUCCEEDED", logs[-4000:]
    assert "resuming from" in logs and "joined Ray cluster at" in logs  # the head's Ray, not a private one
    assert "held-out score:" in logs, logs[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == total and 0.0 <= summary["eval_final"] <= 1.0
    trained = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "reward/mean" in line]
    assert trained == list(range(1, total + 1))  # each once: steps after the checkpoint are redone


def test_job_asking_for_missing_gpus_fails_fast(head, tmp_path):
    started = time.monotonic()
    job_id = submit(head, tmp_path / "run", "generation.num_actors=1", "generation.num_gpus=1")
    state = wait_for_end(head, job_id, 120)
    seconds = time.monotonic() - started
    logs = job_logs(head, job_id)
    print(f"\njob {job_id}: {state} after {seconds:.1f} s")
    assert state == "FAILED", logs[-4000:]
    assert "asks for" in logs and "but the cluster has" in logs, logs[-4000:]
    assert "GPU=1" in logs and "GPU=0" in logs, logs[-4000:]
    assert "Traceback" not in logs  # the CLI reports a ResourceError as one line, exit code 2
