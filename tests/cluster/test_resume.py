"""Exact resume: a run cut by SIGKILL and by SIGTERM, then resumed, equals one that ran straight.

Three kinds of `relay train` process in deterministic mode, each its own local Ray:
- A runs 6 steps straight;
- B1 is SIGKILLed from outside as soon as its step-3 checkpoint is complete (it is then inside
  step 4: that work is lost, and redone by the resume);
- B2 (`--resume`) is sent SIGTERM once it has trained step 4: it finishes the step in flight,
  checkpoints and exits 143;
- B3 (`--resume`) runs to step 6.
A's and B's final policies must agree within 1e-6 and their per-step rewards after the first
cut must be equal; B's metrics log has each step once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
STEPS = 6
RUN = ["train.deterministic=true", f"train.steps={STEPS}", "checkpoint.every=3", "checkpoint.every_s=null",
       "train.eval_every=100", "train.eval_prompts=20", "train.prompts_per_step=16",
       "generation.samples_per_prompt=4", "sft.steps=30",
       # graded on any response, so the 30-step SFT policy gets a signal and the weights move every step
       "reward.sources=[{name: length, kind: rule, rule: length_penalty}]", "learner.warmup_steps=0", "learner.lr=5e-4",
       "train.time_limit_s=null", "metrics.progress=false", "metrics.prometheus=false", "reward.http_enabled=false",
       f"model.cache_dir={REPO / '.relay_cache'}", "cluster.local_num_cpus=4"]


def relay_train(run_dir: Path, *extra: str) -> subprocess.Popen:
    sets = [a for o in (*RUN, f"train.run_dir={run_dir}") for a in ("--set", o)]
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", *extra, *sets], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"relay train still running after {timeout} s:\n{out[-4000:]}") from None
    return proc.returncode, out


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"relay train exited {proc.returncode} early:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def steps_logged(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trained_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in steps_logged(run_dir) if "reward/mean" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    straight, cut = root / "A", root / "B"
    code, out = finish(relay_train(straight))
    assert code == 0, out[-4000:]

    b1 = relay_train(cut)
    wait_for(lambda: (cut / "checkpoints" / "step_3" / "driver_state.json").exists(), b1)
    os.killpg(b1.pid, signal.SIGKILL)  # the driver and its local Ray, as a lost head node would
    killed_at = time.time()
    b1.communicate()
    assert not (cut / "checkpoints" / "final").exists()

    b2 = relay_train(cut, "--resume")
    wait_for(lambda: 4 in trained_steps(cut), b2)
    first_step_after = next(r["time"] for r in steps_logged(cut) if r["step"] == 4 and "reward/mean" in r)
    b2.send_signal(signal.SIGTERM)
    code, out2 = finish(b2)
    assert code == 143, out2[-4000:]
    assert "continue with: relay train --resume" in out2

    code, out3 = finish(relay_train(cut, "--resume", str(cut)))
    assert code == 0, out3[-4000:]
    print(f"\ndriver SIGKILL -> first step after --resume: {first_step_after - killed_at:.1f} s")
    return straight, cut, out2


def test_resumed_run_equals_the_straight_one(runs):
    straight, cut, _ = runs
    a = load_file(str(straight / "checkpoints" / "final" / "model.safetensors"))
    b = load_file(str(cut / "checkpoints" / "final" / "model.safetensors"))
    start = load_file(str(cut / "checkpoints" / "step_3" / "model.safetensors")) \
        if (cut / "checkpoints" / "step_3").exists() else None
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"final weights differ by {diff}"
    if start is not None:  # the run did move after the cut, so equality is not trivial
        assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4
    rewards = {r["step"]: r["reward/mean"] for r in steps_logged(straight) if "reward/mean" in r}
    resumed = {r["step"]: r["reward/mean"] for r in steps_logged(cut) if "reward/mean" in r}
    assert resumed == rewards
    assert len(set(rewards.values())) > 1


def test_each_step_trained_and_logged_once(runs):
    _, cut, _ = runs
    assert trained_steps(cut) == list(range(1, STEPS + 1))
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["steps"] == STEPS
    learner_state = torch.load(cut / "checkpoints" / "final" / "trainer_state.pt", weights_only=False)
    assert learner_state["version"] == STEPS  # one published version per trained step, none twice


def test_sigterm_checkpoints_the_step_in_flight(runs):
    _, cut, out = runs
    assert "SIGTERM: the step in flight finished; writing a checkpoint" in out
    assert "stopped by SIGTERM after step" in out
