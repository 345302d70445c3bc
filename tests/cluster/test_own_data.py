"""A task from files only, end to end, as a user runs it: the example's data script writes JSONL, the
reward is a function in its own file, and `relay pipeline` SFTs the tiny model on the file and runs GRPO
with the function reward through a real Ray, Serve and vLLM. Short: it checks the wiring, not learning
(the README's 10-minute run of the same example shows learning)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_from_a_jsonl_file_with_a_function_reward(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples/maximum/make_data.py"), str(tmp_path / "data")],
                   check=True, timeout=60)
    # Second eval set: the first 40 held-out records under another name.
    lines = (tmp_path / "data" / "eval.jsonl").read_text().splitlines()
    (tmp_path / "data" / "small.jsonl").write_text("\n".join(lines[:40]) + "\n")
    config = tmp_path / "relay.yaml"
    config.write_text((REPO / "examples/maximum/relay.yaml").read_text()
                      .replace("examples/maximum/data/", f"{tmp_path}/data/")
                      .replace("examples/maximum/reward.py", str(REPO / "examples/maximum/reward.py")))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cluster.cli", "pipeline", "--config", str(config),
           "--set", f"train.run_dir={run}", "--set", f"model.cache_dir={tmp_path / 'cache'}",
           "--set", "sft.steps=40", "--set", "model.tiny.num_layers=1",
           "--set", f"data.eval=[{{path: {tmp_path}/data/eval.jsonl, name: heldout}}, "
                    f"{{path: {tmp_path}/data/small.jsonl, name: small}}]",
           "--set", "train.steps=3", "--set", "train.eval_every=2", "--set", "train.eval_prompts=48",
           "--set", "train.eval_k=2", "--set", "train.prompts_per_step=16",
           "--set", "reward.http_enabled=false", "--set", "metrics.progress=false"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the local Ray takes Serve down with it: no console lines about calls to a Serve controller killed under them
    assert "ServeController" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    sft = json.loads((run / "sft" / "stage_done.json").read_text())
    assert 0.0 <= sft["metrics"]["heldout_greedy_accuracy"] <= 1.0
    assert not (run / "rm").exists()  # pipeline.stages: [sft, rl]
    rows = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/task_score" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    for r in evals:
        assert 0.0 <= r["eval/pass_at_k"] <= 1.0 and r["eval/mean_at_k"] <= r["eval/pass_at_k"] + 1e-9
        assert r["eval/set_task_score{eval_set=heldout}"] == r["eval/task_score"]
        assert "eval/set_task_score{eval_set=small}" in r and "eval/set_pass_at_k{eval_set=small}" in r
    steps = [r for r in rows if "reward/mean" in r]
    assert len(steps) == 3 and all(r["reward/excluded_total"] == 0 for r in steps)
    used = json.loads((run / "rl" / "config.json").read_text())
    assert [s["kind"] for s in used["reward"]["sources"]] == ["function"]  # not replaced by a learned RM
    assert used["train"]["eval_reward"] is None  # so the held-out score is the function's
    assert (run / "rl" / "checkpoints" / "final" / "model.safetensors").is_file()
