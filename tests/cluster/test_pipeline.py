"""``relay pipeline``: stage markers, skipping, forcing, dependencies; real SFT and RM stages on tiny
settings (no Ray); the full SFT -> RM -> RL run is ``slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster import pipeline
from cluster.config import load_config
from cluster.driver import RunError
from cluster.pipeline import MARKER, read_marker, rl_config, run_pipeline, run_stage


@pytest.fixture
def fake_stages(monkeypatch):
    """Stage functions that write a file and count their calls."""
    calls: list[str] = []

    def make(name):
        def fn(cfg, out: Path, log):
            calls.append(name)
            out.mkdir(parents=True, exist_ok=True)
            (out / "weights.txt").write_text(name)
            return {"value": float(len(calls)), "checkpoint": str(out)}
        return fn

    monkeypatch.setattr(pipeline, "STAGE_FNS", {s: make(s) for s in pipeline.STAGES})
    return calls


def _cfg(tmp_path, *extra):
    return load_config(None, [f"train.run_dir={tmp_path / 'run'}", *extra])


def test_finished_stages_are_skipped(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    first = run_pipeline(cfg, log=lambda _: None)
    assert fake_stages == ["sft", "rm", "rl"]
    assert all((tmp_path / "run" / s / MARKER).is_file() for s in cfg.pipeline.stages)
    assert read_marker(cfg, "rm")["metrics"]["value"] == 2.0
    again = run_pipeline(cfg, log=lambda _: None)
    assert fake_stages == ["sft", "rm", "rl"]  # nothing re-ran
    assert again == first


def test_force_and_force_stage(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    run_pipeline(cfg, log=lambda _: None)
    run_pipeline(cfg, force_stages=("rm",), log=lambda _: None)
    assert fake_stages == ["sft", "rm", "rl", "rm", "rl"]  # rl reads rm, so it is redone too
    run_pipeline(cfg, force_stages=("sft",), log=lambda _: None)
    assert fake_stages[-3:] == ["sft", "rm", "rl"]  # rm starts from the SFT policy
    run_pipeline(cfg, force=True, log=lambda _: None)
    assert fake_stages[-3:] == ["sft", "rm", "rl"]


def test_single_stage_and_missing_dependency(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    with pytest.raises(RunError, match=r"needs finished stage\(s\) \['sft', 'rm'\]"):
        run_stage(cfg, "rl", log=lambda _: None)
    with pytest.raises(RunError, match=r"needs finished stage\(s\) \['sft'\]"):
        run_stage(cfg, "rm", log=lambda _: None)  # the reward model starts from the SFT policy
    run_pipeline(cfg, stages=("sft",), log=lambda _: None)
    run_pipeline(cfg, stages=("rm",), log=lambda _: None)
    assert fake_stages == ["sft", "rm"]
    with pytest.raises(RunError, match="unknown pipeline stage"):
        run_pipeline(cfg, stages=("ppo2",), log=lambda _: None)


def test_crashed_stage_is_redone_from_scratch(tmp_path, fake_stages):
    cfg = _cfg(tmp_path)
    leftover = tmp_path / "run" / "sft" / "partial.bin"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("half written")
    run_pipeline(cfg, stages=("sft",), log=lambda _: None)
    assert fake_stages == ["sft"] and not leftover.exists()


def test_rl_config_wires_sft_policy_and_rm_reward(tmp_path):
    cfg = _cfg(tmp_path, "algorithm.name=ppo")
    (tmp_path / "run" / "rm").mkdir(parents=True)
    rl = rl_config(cfg)
    assert rl.learner.critic_init == str((tmp_path / "run" / "rm").resolve())  # InstructGPT: V from the RM
    assert rl.model.path == str((tmp_path / "run" / "sft").resolve())
    assert [(s.kind, s.model_path) for s in rl.reward.sources] == [("model", str((tmp_path / "run" / "rm").resolve()))]
    assert rl.train.run_dir == str(tmp_path / "run" / "rl")
    assert rl.algorithm.name == "ppo"
    assert rl.learner.critic_warmup_steps == 20 and rl.learner.lr == 2e-4  # the RLHF defaults, unless set
    unset = rl_config(_cfg(tmp_path, "algorithm.name=ppo", "learner.critic_warmup_steps=0", "learner.lr=1e-4"))
    assert unset.learner.critic_warmup_steps == 0 and unset.learner.lr == 1e-4
    assert rl_config(_cfg(tmp_path)).learner.lr == 1e-4  # GRPO keeps relay train's default
    assert cfg.model.path is None  # the user's config is not touched


def test_rl_config_serves_an_ensemble_with_its_penalty(tmp_path):
    cfg = _cfg(tmp_path, "algorithm.name=ppo", "reward_model.ensemble_size=3", "reward_model.uncertainty_penalty=0.5")
    for k in range(3):
        (tmp_path / "run" / "rm" / f"member_{k}").mkdir(parents=True)
    rl = rl_config(cfg)
    (source,) = rl.reward.sources
    members = [str((tmp_path / "run" / "rm" / f"member_{k}").resolve()) for k in range(3)]
    assert (source.kind, source.model_paths, source.uncertainty_penalty) == ("ensemble", members, 0.5)
    assert rl.learner.critic_init == members[0]


def test_real_sft_and_rm_stages_then_skip(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, f"model.cache_dir={tmp_path / 'cache'}", "sft.steps=3", "sft.batch_size=16",
               "model.tiny.num_layers=1", "data.addition.n_train=200", "data.addition.n_eval=64",
               "train.eval_prompts=64",
               "reward_model.n_pairs=40", "reward_model.policy_samples=2", "reward_model.epochs=1")
    results = run_pipeline(cfg, stages=("sft", "rm"), log=lambda _: None)
    sft_dir, rm_dir = tmp_path / "run" / "sft", tmp_path / "run" / "rm"
    assert (sft_dir / "config.json").is_file() and (sft_dir / "model.safetensors").is_file()
    assert (rm_dir / "config.json").is_file()
    assert 0.0 <= results["sft"]["metrics"]["heldout_greedy_accuracy"] <= 1.0
    assert "rm/eval_accuracy" in results["rm"]["metrics"] and "rm/policy_pair_accuracy" in results["rm"]["metrics"]
    assert (rm_dir / "model.safetensors").stat().st_size < 10e6  # started from the tiny SFT policy, not MiniLM
    stamp = (sft_dir / MARKER).stat().st_mtime_ns, (rm_dir / MARKER).stat().st_mtime_ns
    logs: list[str] = []
    run_pipeline(cfg, stages=("sft", "rm"), log=logs.append)
    assert ((sft_dir / MARKER).stat().st_mtime_ns, (rm_dir / MARKER).stat().st_mtime_ns) == stamp
    assert sum("skipping" in line for line in logs) == 2
    assert json.loads((rm_dir / MARKER).read_text())["checkpoint"] == str(rm_dir.resolve())


@pytest.mark.slow
def test_full_pipeline_with_ppo(tmp_path):
    """SFT (30 steps) -> RM from it -> 2 PPO steps through Ray and the reward service."""
    cfg = _cfg(tmp_path, "sft.steps=30", "reward_model.n_pairs=40", "reward_model.policy_samples=1",
               "reward_model.epochs=1", "algorithm.name=ppo", "algorithm.kl_in=reward",
               "algorithm.kl_target=0.05", "train.steps=2", "train.eval_every=1", "train.eval_prompts=32",
               "train.prompts_per_step=16", "metrics.progress=false", "metrics.prometheus=false",
               "learner.torch_threads=1", "learner.critic_warmup_steps=1")  # step 1 critic only, step 2 both
    results = run_pipeline(cfg, log=print)
    assert Path(results["rl"]["checkpoint"], "config.json").is_file()
    rows = [json.loads(line) for line in (tmp_path / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert "learner/value_loss" in rows[1] and "eval/win_rate_vs_reference" in rows[-1]
    assert [r.get("learner/critic_warmup") for r in rows if "learner/critic_warmup" in r] == [1.0, 0.0]
    assert rows[0]["eval/win_rate_vs_reference"] == 0.5  # step 0: the policy is the reference
    assert rows[0]["eval/kl_to_reference"] == pytest.approx(0.0, abs=1e-3)


def test_rl_cut_off_mid_run_continues_from_its_checkpoint(tmp_path, fake_stages, monkeypatch):
    """An RL stage with a complete checkpoint and no marker (the job died inside RL) is resumed, not redone."""
    cfg = _cfg(tmp_path)
    run_pipeline(cfg, stages=("sft", "rm"), log=lambda _: None)
    ckpt = tmp_path / "run" / "rl" / "checkpoints" / "step_8"
    ckpt.mkdir(parents=True)
    (ckpt / "driver_state.json").write_text(json.dumps({"step": 8}))
    resumed = []

    def rl(cfg, out, log, resume=False):
        resumed.append(resume)
        assert (out / "checkpoints" / "step_8").is_dir() == resume  # kept to resume from; wiped when forced
        return {"checkpoint": str(out)}

    monkeypatch.setitem(pipeline.STAGE_FNS, "rl", rl)
    run_pipeline(cfg, log=lambda _: None)
    assert resumed == [True]
    run_pipeline(cfg, force_stages=("rl",), log=lambda _: None)  # forced: starts clean
    assert resumed == [True, False]
