"""Bad input to `relay train`: one clear message, no traceback, a non-zero exit, nothing clobbered.

All of these fail before Ray starts. They call the CLI's ``main`` in-process (imports are paid
once); one test runs the real console entry point in a subprocess to pin the exit code.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import ray  # noqa: F401 - imported here, Ray's log handler binds the real stderr rather than one test's capture

from cluster.cli import main

_CAPSYS = None

REPO = Path(__file__).resolve().parents[2]
TINY = ["--set", "sft.steps=30", "--set", f"model.cache_dir={REPO / '.relay_cache'}"]


@pytest.fixture(autouse=True)
def _capture(capsys, monkeypatch):
    global _CAPSYS
    _CAPSYS = capsys
    monkeypatch.chdir(REPO)


def relay(*args):
    code = main(list(args))
    return code, _CAPSYS.readouterr().err


def test_console_entry_point_exits_non_zero():
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "train", "--set", "generation.num_actors=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "generation.num_actors" in proc.stderr and "Traceback" not in proc.stderr


def relay_policy() -> str:
    """The cached 30-step SFT policy (a real checkpoint directory)."""
    from cluster.config import load_config
    from cluster.driver import resolve_policy

    return resolve_policy(load_config(overrides=[o for o in TINY if o != "--set"]), log=lambda _: None)


def assert_one_clear_error(code, stderr, *needles):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    line = [x for x in stderr.splitlines() if x.startswith("relay train: error:")]
    assert line, stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_missing_model_path(tmp_path):
    code, err = relay("train", "--set", f"model.path={tmp_path / 'nope'}")
    assert_one_clear_error(code, err, "model.path", "no config.json")


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("generation: {num_actors: 2\n")
    assert_one_clear_error(*relay("train", "--config", str(bad)), "not valid YAML")


def test_unknown_key(tmp_path):
    assert_one_clear_error(*relay("train", "--set", "learner.warmup_step=10"),
                           "unknown key 'learner.warmup_step'", "did you mean 'learner.warmup_steps'")


def test_zero_actors():
    assert_one_clear_error(*relay("train", "--set", "generation.num_actors=0"), "generation.num_actors")


def test_prompt_longer_than_context():
    assert_one_clear_error(*relay("train", *TINY, "--set", "generation.max_model_len=8"),
                           "more than generation.max_model_len - generation.max_tokens = 2")


@pytest.mark.parametrize("override", ["data.addition.n_train=0", "data.addition.n_eval=0"])
def test_empty_dataset(override):
    assert_one_clear_error(*relay("train", "--set", override), override.split("=")[0])


def test_nothing_already_written_is_clobbered(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "time": 0}\n')
    code, err = relay("train", *TINY, "--set", f"train.run_dir={run_dir}", "--set", "generation.max_model_len=8")
    assert code == 2
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "time": 0}\n'


def test_gpu_example_stops_clearly_without_a_gpu(tmp_path):
    """cluster/examples/gsm8k_one_gpu.yaml validates here, and then stops on what this machine lacks: first the
    model it names, then (given a model) the GPU."""
    example = ("train", "--config", "cluster/examples/gsm8k_one_gpu.yaml")
    assert_one_clear_error(*relay(*example), "model.path", "no config.json")
    policy = relay_policy()
    tiny = [f"model.path={policy}", "model.tokenizer=null", "data.chat_template=false",
            "data.system_prompt=null", "data.template='{question}'"]
    assert_one_clear_error(*relay(*example, *(a for o in tiny for a in ("--set", o))), "GPU")


def test_bad_data_file_names_the_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=" "answer": "4"}\n')
    assert_one_clear_error(*relay("train", "--set", f"data.train={data}"), "d.jsonl:2: not valid JSON")


def test_missing_data_field_lists_the_columns(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "1+1=", "answer": "2"}\n')
    assert_one_clear_error(*relay("train", "--set", f"data.train={data}"), "missing prompt field 'prompt'",
                           "['answer', 'question']")
