"""Every `relay` command fed bad input: one clear message, no traceback, a non-zero exit, nothing lost.

One row per mistake: (id, argv, words the message must hold). ``{d}`` in argv is a directory of prepared
bad inputs (see ``bad``). Every case calls the CLI's ``main`` in this process and must stop before Ray
starts or a model is built (both are made to fail the test if reached), and must leave every file that
was in ``{d}`` as it was. A run directory locked by another process needs that process: its own test, at the end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.config import load_config

CASES = [
    # ---- wrong types and out-of-range values
    ("steps-negative", ["train", "--set", "train.steps=-1"], "train.steps: Input should be greater than or equal to 1"),
    ("steps-not-a-number", ["train", "--set", "train.steps=abc"], "train.steps: Input should be a valid integer"),
    ("steps-float", ["train", "--set", "train.steps=1.5"], "train.steps: Input should be a valid integer, got a "
                                                           "number with a fractional part (got 1.5)"),
    ("steps-empty", ["train", "--set", "train.steps="], "train.steps: Input should be a valid integer"),
    ("temperature-zero", ["train", "--set", "generation.temperature=0"], "generation.temperature: Input should be "
                                                                         "greater than 0 (got 0)"),
    ("top-p-above-one", ["train", "--set", "generation.top_p=2"], "generation.top_p: Input should be less than or "
                                                                  "equal to 1 (got 2)"),
    ("lr-negative", ["train", "--set", "learner.lr=-1"], "learner.lr: Input should be greater than 0 (got -1)"),
    ("no-actors", ["pipeline", "--set", "generation.num_actors=0"], "generation.num_actors: Input should be greater"),
    ("actors-float", ["eval", "--policy", "{d}/nope", "--set", "generation.num_actors=2.5"],
     "generation.num_actors: Input should be a valid integer, got a number with a fractional part"),
    ("bool-not-bool", ["train", "--set", "metrics.jsonl=maybe"], "metrics.jsonl: Input should be a valid boolean"),
    ("unknown-algorithm", ["train", "--set", "algorithm.name=ppo2"], "algorithm.name: Input should be 'grpo'"),
    ("section-given-a-value", ["train", "--set", "generation=3"], "generation: Input should be a valid dictionary"),
    ("value-given-a-section", ["train", "--set", "train.steps.x=1"], "train.steps: Input should be a valid integer "
                                                                     "(got a section: {x})"),
    ("key-below-a-value", ["train", "--set", "train.steps=3", "--set", "train.steps.x=1"],
     "--set train.steps.x: 'steps' is a value, not a section"),
    # ---- unknown keys: the nearest correct one is named
    ("section-left-empty", ["train", "--config", "{d}/empty_section.yaml"], "generation: the section is empty"),
    ("rule-unknown", ["train", "--set", "reward.sources=[{name: r, kind: rule, rule: exact}]"],
     "reward.sources['r'].rule: unknown rule 'exact'"),
    ("misspelt-key", ["train", "--set", "generation.tempreature=0.5"], "did you mean 'generation.temperature'?"),
    ("misspelt-section", ["train-rm", "--set", "generaton.temperature=0.5"], "did you mean 'generation'?"),
    ("misspelt-key-in-file", ["train", "--config", "{d}/typo.yaml"], "did you mean 'train.steps'?"),
    # ---- the config file itself
    ("yaml-not-a-mapping", ["train", "--config", "{d}/list.yaml"], "must be a mapping of sections, got list"),
    ("yaml-a-scalar", ["pipeline", "--config", "{d}/scalar.yaml"], "must be a mapping of sections, got int"),
    ("yaml-syntax-error", ["train", "--config", "{d}/broken.yaml"], "is not valid YAML: expected ',' or '}', but got "
                                                                    "'<stream end>' at line 2, column 1"),
    ("yaml-not-utf8", ["train", "--config", "{d}/latin1.yaml"], "is not UTF-8 text"),
    ("config-missing", ["train", "--config", "{d}/nope.yaml"], "nope.yaml' does not exist"),
    ("config-is-a-directory", ["eval", "--policy", "{d}/nope", "--config", "{d}"], "is a directory; give the "
                                                                                   "experiment's YAML file"),
    # ---- --set itself
    ("set-without-equals", ["train", "--set", "train.steps"], "expected KEY=VALUE"),
    ("set-empty-key", ["train", "--set", "=3"], "expected KEY=VALUE"),
    ("set-empty-key-part", ["train", "--set", "train..steps=3"], "'train..steps' has an empty part"),
    ("set-value-not-yaml", ["train", "--set", "train.steps=[1"], "the value is not valid YAML"),
    # ---- settings that cannot work together
    ("max-tokens-fill-context", ["train", "--set", "generation.max_tokens=64"],
     "generation.max_tokens (64) must be less than generation.max_model_len (64)"),
    ("group-algorithm-one-sample", ["train", "--set", "generation.samples_per_prompt=1"],
     "algorithm.name=grpo compares the responses to one prompt, so it needs generation.samples_per_prompt >= 2"),
    ("reinforce-one-sample-dropped", ["train", "--set", "generation.samples_per_prompt=1", "--set",
                                      "algorithm.name=reinforce"], "Set drop_uniform_groups to false"),
    ("kl-target-without-penalty", ["train", "--set", "algorithm.kl_target=0.1"], "algorithm.kl_in is none"),
    ("micro-batch-size-renamed", ["train", "--set", "learner.micro_batch_size=64"],
     "learner.micro_batch_size was replaced by learner.micro_batch_tokens"),
    ("builtin-and-file", ["train", "--set", "data.builtin=addition", "--set", "data.train={d}/data.jsonl"],
     "not both"),
    ("stages-out-of-order", ["pipeline", "--set", "pipeline.stages=[rl, sft]"], "in that order"),
    ("more-eval-prompts-than-exist", ["train", "--set", "train.eval_prompts=501"],
     "train.eval_prompts (501) exceeds data.addition.n_eval (500)"),
    # ---- paths in the config
    ("data-missing", ["train", "--set", "data.train={d}/nope.jsonl"], "nope.jsonl' does not exist"),
    ("data-dir-not-a-dataset", ["train", "--set", "data.train={d}/plain_dir"], "is a directory but not one written "
                                                                               "by datasets' save_to_disk"),
    ("data-empty-file", ["train", "--set", "data.train={d}/empty.jsonl"], "empty.jsonl: the file is empty"),
    ("data-unknown-format", ["train", "--set", "data.train={d}/notes.txt"], "unknown format '.txt'"),
    ("eval-data-missing", ["train", "--set", "data.train={d}/data.jsonl", "--set", "data.eval={d}/nope.jsonl"],
     "nope.jsonl' does not exist"),
    ("model-path-a-file", ["train", "--set", "model.path={d}/notes.txt"], "(no config.json: it is a file)"),
    ("model-path-not-a-checkpoint", ["train", "--set", "model.path={d}/plain_dir"], "(no config.json in it)"),
    ("model-path-missing-pipeline", ["pipeline", "--stage", "sft", "--set", "model.path={d}/nope", "--set",
                                     "train.run_dir={d}/pipeline_run"], "is not a Hugging Face checkpoint directory "
                                                                        "(no config.json)"),
    ("model-path-missing-eval", ["eval", "--policy", "{d}/checkpoint", "--set", "model.path={d}/nope"],
     "(no config.json)"),
    ("model-path-missing-train-rm", ["train-rm", "--out", "{d}/rm", "--set", "model.path={d}/nope"],
     "(no config.json)"),
    ("tokenizer-missing", ["train", "--set", "model.tokenizer={d}/nope"], "model.tokenizer '{d}/nope' does not "
                                                                          "exist"),
    ("critic-init-missing", ["train", "--set", "algorithm.name=ppo", "--set", "learner.critic_init={d}/nope"],
     "is not a directory"),
    ("unknown-stage", ["pipeline", "--stage", "ppo"], "unknown pipeline stage(s) ['ppo']"),
    # ---- relay report
    ("report-missing-dir", ["report", "{d}/nope"], "run directory '{d}/nope' does not exist"),
    ("report-on-a-file", ["report", "{d}/notes.txt"], "is a file, not a directory"),
    ("report-without-metrics", ["report", "{d}/plain_dir"], "metrics.jsonl does not exist"),
    ("report-empty-log", ["report", "{d}/empty_run"], "holds no steps yet"),
    ("report-corrupt-log", ["report", "{d}/corrupt_run"], "metrics.jsonl:2 is not valid JSON"),
    ("report-dir-taken-by-a-file", ["report", "{d}/report_is_a_file"], "move the file away"),
    # ---- relay eval
    ("eval-policy-missing", ["eval", "--policy", "{d}/nope"], "--policy '{d}/nope' does not exist"),
    ("eval-policy-a-file", ["eval", "--policy", "{d}/notes.txt"], "is a file: give a checkpoint directory"),
    ("eval-policy-not-a-checkpoint", ["eval", "--policy", "{d}/plain_dir"], "has no config.json"),
    ("eval-rm-missing", ["eval", "--policy", "{d}/checkpoint", "--rm", "{d}/nope"], "--rm '{d}/nope' does not exist"),
    ("eval-out-a-directory", ["eval", "--policy", "{d}/checkpoint", "--out", "{d}/plain_dir"], "is a directory"),
    ("eval-out-in-missing-dir", ["eval", "--policy", "{d}/checkpoint", "--out", "{d}/nope/m.json"],
     "is in a directory that does not exist"),
    ("eval-without-policy", ["eval"], "the following arguments are required: --policy"),
    # ---- relay train-rm
    ("rm-out-a-file", ["train-rm", "--out", "{d}/notes.txt"], "is a file; give a directory"),
    ("rm-out-below-a-file", ["train-rm", "--out", "{d}/notes.txt/rm"], "is a file; give a directory"),
    ("rm-out-someone-elses-dir", ["train-rm", "--out", "{d}/plain_dir"], "holds files that are not a reward-model "
                                                                         "checkpoint (readme.md)"),
    # ---- the run directory, and --resume
    ("run-dir-a-file", ["train", "--set", "train.run_dir={d}/notes.txt"], "train.run_dir '{d}/notes.txt' is a file; "
                                                                          "point it at a directory"),
    ("run-dir-below-a-file", ["train", "--set", "train.run_dir={d}/notes.txt/run"],
     "train.run_dir '{d}/notes.txt/run' is not writable (Not a directory)"),
    ("resume-missing-dir", ["train", "--resume", "{d}/nope"], "--resume: '{d}/nope' does not exist; give the "
                                                              "train.run_dir of a run that was started"),
    ("resume-a-file", ["train", "--resume", "{d}/notes.txt"], "--resume: '{d}/notes.txt' is a file"),
    ("resume-no-config", ["train", "--resume", "{d}/plain_dir"], "--resume: '{d}/plain_dir' holds no run (no "
                                                                 "config.json)"),
    ("resume-default-run-dir-empty", ["train", "--resume", "--set", "train.run_dir={d}/plain_dir"],
     "--resume: '{d}/plain_dir' holds no run"),
    ("resume-no-complete-checkpoint", ["train", "--resume", "{d}/half_run"],
     "--resume: {d}/half_run has no complete checkpoint to continue from (only unfinished writes: "
     "['.staging-step_3']); start the run without --resume"),
    ("resume-changes-algorithm", ["train", "--resume", "{d}/half_run", "--set", "algorithm.name=ppo"],
     "cannot continue with a changed algorithm.name (algorithm.name: 'grpo' -> 'ppo')"),
    ("resume-changes-lr", ["train", "--resume", "{d}/half_run", "--set", "learner.lr=0.5"],
     "cannot continue with a changed learner.lr (learner.lr: 0.0001 -> 0.5)"),
    ("resume-config-changes-data", ["train", "--resume", "{d}/half_run", "--config", "{d}/other_data.yaml"],
     "cannot continue with a changed data.addition.n_train"),
    # ---- the command line itself
    ("unknown-command", ["trian"], "invalid choice: 'trian'"),
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """A directory of bad (and a few good) inputs the rows point at."""
    d = tmp_path_factory.mktemp("bad")
    (d / "typo.yaml").write_text("train:\n  stpes: 3\n")
    (d / "list.yaml").write_text("- train\n- generation\n")
    (d / "scalar.yaml").write_text("42\n")
    (d / "empty_section.yaml").write_text("generation:\n  # num_actors: 2\ntrain:\n  steps: 3\n")
    (d / "empty.jsonl").write_text("\n")
    (d / "broken.yaml").write_text("generation: {num_actors: 2\n")
    (d / "latin1.yaml").write_bytes("train:\n  run_dir: caf\xe9\n".encode("latin-1"))
    (d / "data.jsonl").write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    (d / "notes.txt").write_text("not a dataset, a model or a config\n")
    (d / "plain_dir").mkdir()
    (d / "plain_dir" / "readme.md").write_text("someone's files\n")
    (d / "empty_run").mkdir()
    (d / "empty_run" / "metrics.jsonl").write_text("")
    (d / "corrupt_run").mkdir()
    (d / "corrupt_run" / "metrics.jsonl").write_text('{"step": 1, "time": 0}\n{"step": 2,\n{"step": 3, "time": 2}\n')
    (d / "report_is_a_file").mkdir()
    (d / "report_is_a_file" / "metrics.jsonl").write_text('{"step": 1, "time": 0}\n')
    (d / "report_is_a_file" / "report").write_text("my notes, not a report directory\n")
    (d / "checkpoint").mkdir()
    (d / "checkpoint" / "config.json").write_text("{}\n")  # passes the CLI's check; never loaded
    (d / "other_data.yaml").write_text("data:\n  addition:\n    n_train: 100\n")
    _started_run(d / "half_run")
    (d / "half_run" / "checkpoints" / ".staging-step_3").mkdir(parents=True)  # killed while writing its first
    (d / "half_run" / "checkpoints" / ".staging-step_3" / "model.safetensors").write_text("half\n")
    return d


def _started_run(run_dir: Path) -> None:
    """The config.json that ``relay train`` writes into the run directory it starts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(load_config(None, [f"train.run_dir={run_dir}"]).model_dump_json())


@pytest.fixture(autouse=True)
def nothing_heavy_starts(monkeypatch):
    """Bad input must be refused before Ray starts or a model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("reached Ray or model building: the input should have been refused earlier")

    monkeypatch.setattr("ray.init", refuse)
    monkeypatch.setattr("learner.bootstrap.ensure_default_policy", refuse)


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(argv, expected, id=case_id)
                                                for case_id, argv, expected in CASES])
def test_bad_input_ends_in_one_clear_message(argv, expected, bad, capsys):
    before = _files(bad)
    try:
        code = main([arg.replace("{d}", str(bad)) for arg in argv])
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    err = capsys.readouterr().err
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    assert err.count("error:") == 1, err
    assert expected.replace("{d}", str(bad)) in err, err
    after = _files(bad)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing lost or rewritten


HOLD_LOCK = """
import os, sys
from cluster.checkpoint import RunDirLock
lock = RunDirLock(sys.argv[1])
lock.acquire()
print(os.getpid(), flush=True)
sys.stdin.read()  # held until the test closes stdin
"""


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_run_dir_in_use_by_another_process(tmp_path, capsys, resume):
    run_dir = tmp_path / "run"
    _started_run(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir)], cwd=Path(__file__).parents[2],
                              text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == str(holder.pid)
        before = _files(run_dir)
        argv = ["train", "--resume", str(run_dir)] if resume else ["train", "--set", f"train.run_dir={run_dir}"]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
        assert f"run directory {str(run_dir)!r} is in use by another relay process (pid {holder.pid}); wait for " \
               "it, stop it, or set another train.run_dir" in err, err
        assert _files(run_dir) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
