"""``relay dpo`` end to end on a real local Ray: pairs from a file (one bad record skipped), reference log-probs
cached, steps, held-out evaluation, checkpoints, a resume that continues where the run stopped, the report."""

from __future__ import annotations

import json
import random

import pytest

from cluster.cli import main
from cluster.report import make_report


def _pairs_file(path, n: int = 48) -> str:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        rows.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + rng.choice([-2, -1, 1, 3]))})
    rows.append({"prompt": "1+1=", "chosen": "2", "rejected": "2"})  # skipped under data.on_invalid: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    args = ["--set", "sft.steps=30", "--set", "model.cache_dir=.relay_cache", "--set", f"train.run_dir={tmp / 'run'}",
            "--set", f"dpo.preferences_path={_pairs_file(tmp / 'pairs.jsonl')}", "--set", "dpo.eval_fraction=0.2",
            "--set", "dpo.batch_size=8", "--set", "dpo.eval_every=2", "--set", "train.eval_prompts=16",
            "--set", "data.on_invalid=skip", "--set", "metrics.prometheus=false", "--set", "learner.lr=1e-3",
            "--set", "learner.torch_threads=1"]
    assert main(["dpo", *args, "--set", "dpo.steps=4"]) == 0
    first = json.loads((tmp / "run" / "summary.json").read_text())
    assert main(["dpo", "--resume", str(tmp / "run"), "--set", "dpo.steps=6"]) == 0
    return tmp / "run", first, json.loads((tmp / "run" / "summary.json").read_text())


def test_dpo_trains_evaluates_and_checkpoints(run):
    run_dir, first, _ = run
    assert first["steps"] == 4 and first["pairs"] + first["eval_pairs"] == 48  # the bad record was skipped
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "offline/loss" in r]
    assert [r["step"] for r in steps][:4] == [1, 2, 3, 4]
    evals = [r for r in records if "eval/accuracy_heldout" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval/margin_heldout"] == pytest.approx(0.0, abs=1e-5)  # policy = ref
    assert 0.0 <= evals[-1]["eval/task_score"] <= 1.0
    assert (run_dir / "reference_logprobs.json").is_file() and (run_dir / "pairs" / "train.jsonl").is_file()
    assert (run_dir / "checkpoints" / "final" / "model.safetensors").is_file()


def test_resume_continues_from_the_last_checkpoint(run):
    run_dir, _, resumed = run
    assert resumed["steps"] == 6
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "offline/loss" in r] == [1, 2, 3, 4, 5, 6]  # no step redone or lost


def test_report_draws_the_preference_panel(run):
    run_dir, _, _ = run
    make_report(run_dir)
    assert (run_dir / "report" / "preference.png").is_file()


def test_pipeline_sft_then_dpo(tmp_path):
    pairs = _pairs_file(tmp_path / "pairs.jsonl", n=24)
    args = ["pipeline", "--set", "pipeline.stages=[sft, dpo]", "--set", "sft.steps=30", "--set",
            "model.cache_dir=.relay_cache", "--set", f"train.run_dir={tmp_path / 'run'}", "--set",
            f"dpo.preferences_path={pairs}", "--set", "dpo.steps=2", "--set", "dpo.eval_every=2", "--set",
            "train.eval_prompts=8", "--set", "data.on_invalid=skip", "--set", "metrics.prometheus=false"]
    assert main(args) == 0
    marker = json.loads((tmp_path / "run" / "dpo" / "stage_done.json").read_text())
    assert marker["metrics"]["steps"] == 2 and marker["checkpoint"].endswith("checkpoints/final")
    config = json.loads((tmp_path / "run" / "dpo" / "config.json").read_text())
    assert config["model"]["path"] == str((tmp_path / "run" / "sft").resolve())  # DPO starts from the SFT stage


def test_rwr_from_records(tmp_path):
    rng = random.Random(1)
    rows = []
    for _ in range(30):
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        right = rng.random() < 0.5
        rows.append({"prompt": f"{a}+{b}=", "response": str(a + b if right else a + b + 1), "reward": float(right)})
    rows.append({"prompt": "1+1=", "response": "2", "reward": "high"})  # not a number: skipped
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["rwr", "--set", "sft.steps=30", "--set", "model.cache_dir=.relay_cache", "--set",
            f"train.run_dir={tmp_path / 'run'}", "--set", f"rwr.path={tmp_path / 'records.jsonl'}", "--set",
            "rwr.steps=3", "--set", "rwr.eval_every=3", "--set", "rwr.batch_size=8", "--set", "train.eval_prompts=8",
            "--set", "data.on_invalid=skip", "--set", "metrics.prometheus=false"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["pairs"] == 30 and summary["algorithm"] == "offline rwr"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "offline/loss" in r]
    assert len(steps) == 3 and all(r["offline/weight_max"] > 1.0 for r in steps)  # weights of mean 1, not all equal
