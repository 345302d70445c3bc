"""``relay pipeline``: SFT -> reward-model training -> RL (PPO by default), resumable by stage.

Each stage writes a Hugging Face checkpoint under ``run_dir/<stage>/`` and, last, a
``stage_done.json`` marker (stage, checkpoint, seconds, metrics). A stage with a marker is skipped
on rerun unless forced (``--force`` for all, ``--force-stage NAME``); a stage directory without a
marker is a crashed attempt and is redone from scratch. Any stage runs alone (``--stage rm``) as
long as the stages it reads have finished.

- ``sft``: the embedded tiny policy (``learner/bootstrap.py``: tokenizer, model, SFT on the configured
  data, cached by a hash of the data and config, copied here) when ``model.path`` is null; otherwise
  ``model.path`` fine-tuned with ``learner/sft.py`` on the data's training records (completion tokens only).
- ``rm``: ``learner/rm_trainer.py::train_reward_model(cfg.reward_model)``. By default the reward model
  starts from the SFT checkpoint and learns from the SFT policy's own samples (judged by the task's
  rule) beside synthetic pairs, so it reads the sft stage. The RM is then normalised so the SFT policy's samples
  score mean 0, std 1 (``reward_model.normalize``); with ``reward_model.ensemble_size`` K > 1 it trains K members
  (``rm/member_<k>``), which the rl stage serves as one ``kind: ensemble`` source (mean - uncertainty_penalty * std).
- ``dpo`` (``pipeline.stages: [sft, dpo]``): ``relay dpo`` (``cluster/offline.py``) from the SFT checkpoint, on
  pairs from ``dpo.preferences_path`` or built from the SFT policy's samples judged by the reward (the RM with
  an rm stage). Its run directory is ``run_dir/dpo``.
- ``rl``: the driver (``cluster/driver.py``) with the policy and the reference both starting from the
  SFT checkpoint, and the reward = one ``kind: model`` source serving the RM checkpoint (replacing
  ``reward.sources``; the other reward settings are kept). The held-out score stays ``reward.sources``
  (``train.eval_reward``), so "held-out score" is the configured reward, not the RM's opinion. With PPO the
  critic starts from the RM (``learner.critic_init``) when the RM shares the policy's tokenizer
  (``reward_model.init=policy``).
  Its run directory (metrics.jsonl, checkpoints/final) is ``run_dir/rl``; its algorithm is ``algorithm.name``.

Simplification: stages run in this process one after another; nothing is parallel across stages.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from cluster import checkpoint
from cluster.config import RelayConfig
from cluster.driver import RunError, resolve_policy
from learner.rm_trainer import member_dirs

STAGES = ("sft", "rm", "rl", "dpo")
MARKER = "stage_done.json"
NEEDS = {"sft": (), "rm": ("sft",), "rl": ("sft", "rm"), "dpo": ("sft", "rm")}


def needs(cfg: RelayConfig, stage: str) -> tuple[str, ...]:
    """The stages ``stage`` reads: rl reads rm only when ``pipeline.stages`` trains a reward model."""
    return tuple(s for s in NEEDS[stage] if s in cfg.pipeline.stages or s == "sft")


def stage_dir(cfg: RelayConfig, stage: str) -> Path:
    return Path(cfg.train.run_dir) / stage


def read_marker(cfg: RelayConfig, stage: str) -> dict | None:
    """The stage's ``stage_done.json``, or None if the stage has not finished."""
    path = stage_dir(cfg, stage) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _sft_stage(cfg: RelayConfig, out: Path, log: Callable[[str], object]) -> dict:
    if cfg.model.path is None:
        from learner.bootstrap import ensure_default_policy, read_sft_report

        built = ensure_default_policy(Path(cfg.model.cache_dir), cfg.sft, cfg.model.tiny, cfg.data, log=log)
        shutil.copytree(built, out)
        return {"heldout_greedy_accuracy": read_sft_report(out)["heldout_greedy_accuracy"], "cached_from": str(built)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.data import load_splits, sft_pairs
    from learner.sft import greedy_accuracy, train_sft

    policy = resolve_policy(cfg, log=log)  # model.path, checked: a RunError if it is no checkpoint directory
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    splits = load_splits(cfg.data, cfg.model.cache_dir, log=log)
    stats = train_sft(model, tokenizer, sft_pairs(splits.train, cfg.data, tokenizer, log=log), cfg.sft, log=log)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    held_out = sft_pairs(splits.main_eval, cfg.data.model_copy(update={"on_invalid": "skip"}), tokenizer, log=log)
    return {"heldout_greedy_accuracy": greedy_accuracy(model, tokenizer, held_out),
            "sft_final_loss": stats["sft/final_loss"]}


def rm_problems(cfg: RelayConfig, tokenizer=None, log: Callable[[str], object] = print) -> tuple[list, list]:
    """(train, held-out) prompts with answers for the reward-model stage, from the data layer."""
    from core.data import format_prompt, load_splits
    from learner.rm_trainer import problems_from

    splits = load_splits(cfg.data, cfg.model.cache_dir, log=log)
    return tuple(problems_from(ex, [format_prompt(e, cfg.data, tokenizer) for e in ex])
                 for ex in (splits.train, splits.main_eval))


def _rm_stage(cfg: RelayConfig, out: Path, log: Callable[[str], object]) -> dict:
    from transformers import AutoTokenizer

    from learner.rm_trainer import train_reward_model

    policy = stage_dir(cfg, "sft").resolve()
    problems = rm_problems(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer or str(policy)), log)
    return train_reward_model(cfg.reward_model, out, problems=problems, policy_path=policy,
                              max_new_tokens=cfg.generation.max_tokens, temperature=cfg.generation.temperature, log=log)


RLHF_CRITIC_WARMUP = 20
"""critic-only steps at the start of the rl stage with PPO (``learner.critic_warmup_steps``), as in the README's runs"""
RLHF_PPO_LR = 2e-4
"""the policy's peak learning rate in the rl stage with PPO (``learner.lr``; ``relay train``'s default is 1e-4). From
the 0.248 start, 15 minutes: 5e-5 gained +11.6, 1e-4 +19.2, 2e-4 +22.5 (README, "From four SFT starts")"""


def rl_config(cfg: RelayConfig) -> RelayConfig:
    """The RL stage's config: policy = SFT checkpoint, reward = the trained RM (when ``pipeline.stages`` has rm;
    else ``reward.sources``), run dir = ``run_dir/rl``."""
    from reward_service.config import RewardSourceConfig

    tree = cfg.model_dump()
    tree["model"]["path"] = str(stage_dir(cfg, "sft").resolve())
    tree["train"]["run_dir"] = str(stage_dir(cfg, "rl"))
    if "rm" not in cfg.pipeline.stages:
        return RelayConfig.model_validate(tree)
    # One forward pass per 256 texts: with Serve's default of 32, scoring took a third of a PPO step.
    rm_dirs = [str(d.resolve()) for d in member_dirs(stage_dir(cfg, "rm"), cfg.reward_model.ensemble_size)]
    serve = {"max_batch_size": 256, "max_ongoing_requests": 256}
    source = RewardSourceConfig(name="rm", kind="model", model_path=rm_dirs[0], **serve) if len(rm_dirs) == 1 else \
        RewardSourceConfig(name="rm", kind="ensemble", model_paths=rm_dirs,
                           uncertainty_penalty=cfg.reward_model.uncertainty_penalty, **serve)
    tree["reward"]["sources"] = [source.model_dump()]
    if cfg.train.eval_reward is None:  # the held-out score stays the configured reward, not the learned RM
        tree["train"]["eval_reward"] = [src.model_dump() for src in cfg.reward.sources]
    lc = cfg.learner
    if cfg.algorithm.name == "ppo" and lc.critic_backbone == "separate" and lc.critic_init is None \
            and cfg.reward_model.init == "policy":
        tree["learner"]["critic_init"] = rm_dirs[0]  # value function from the RM (an ensemble's first member)
    if cfg.algorithm.name == "ppo":  # the README's RLHF runs; a value the user set wins
        if "critic_warmup_steps" not in lc.model_fields_set:
            tree["learner"]["critic_warmup_steps"] = RLHF_CRITIC_WARMUP
        if "lr" not in lc.model_fields_set:
            tree["learner"]["lr"] = RLHF_PPO_LR
    return RelayConfig.model_validate(tree)


def _rl_stage(cfg: RelayConfig, out: Path, log: Callable[[str], object], resume: bool = False) -> dict:
    from cluster.config import check_resumable, load_config
    from cluster.train import train

    rl = rl_config(cfg)
    if resume:  # the cut-off run must be continued with what it was started with
        check_resumable(load_config(out / "config.json"), rl, out)
    summary = train(rl, log=log, resume=resume)  # the summary, with the final checkpoint's path
    if "interrupted" in summary:
        raise RunError(f"the RL stage was stopped by {summary['interrupted']} at step {summary['steps']} (checkpoint "
                       f"{summary['checkpoint']}); run relay pipeline again to continue it")
    return summary


def _dpo_stage(cfg: RelayConfig, out: Path, log: Callable[[str], object], resume: bool = False) -> dict:
    """``relay dpo`` from the SFT checkpoint: pairs from ``dpo.preferences_path``, or built from the SFT policy's
    samples judged by the reward (the trained RM when the pipeline has an rm stage, else ``reward.sources``); the
    held-out score stays the configured reward."""
    from cluster.config import check_resumable, load_config
    from cluster.offline import train_dpo

    tree = rl_config(cfg).model_dump()
    tree["train"]["run_dir"] = str(out)
    dpo = RelayConfig.model_validate(tree)
    if resume:  # the cut-off run must be continued with what it was started with
        check_resumable(load_config(out / "config.json"), dpo, out)
    return train_dpo(dpo, log=log, resume=resume)


STAGE_FNS: dict[str, Callable[[RelayConfig, Path, Callable[[str], object]], dict]] = {
    "sft": _sft_stage, "rm": _rm_stage, "rl": _rl_stage, "dpo": _dpo_stage,
}


def run_stage(cfg: RelayConfig, stage: str, force: bool = False, log: Callable[[str], object] = print) -> dict:
    """Run one stage (or return its marker if it finished and ``force`` is off)."""
    if stage not in STAGE_FNS:
        raise RunError(f"unknown pipeline stage {stage!r}; valid: {', '.join(STAGES)}")
    done = read_marker(cfg, stage)
    if done is not None and not force:
        log(f"pipeline: stage {stage} already done ({done['checkpoint']}); skipping (--force-stage {stage} redoes it)")
        return done
    missing = [s for s in needs(cfg, stage) if read_marker(cfg, s) is None]
    if missing:
        raise RunError(f"pipeline stage {stage!r} needs finished stage(s) {missing} under {cfg.train.run_dir}; "
                       f"run `relay pipeline` (all stages) or `relay pipeline --stage {missing[0]}` first")
    out = stage_dir(cfg, stage)
    resume = stage in ("rl", "dpo") and not force and checkpoint.latest(out) is not None
    if out.exists() and not resume:
        shutil.rmtree(out)  # a crashed attempt or a forced rerun starts clean; RL cut off mid-run continues
    start = time.time()
    log(f"pipeline: stage {stage} -> {out}" + (" (continuing from its last checkpoint)" if resume else ""))
    if stage in ("rl", "dpo"):
        metrics = STAGE_FNS[stage](cfg, out, log, resume=True) if resume else STAGE_FNS[stage](cfg, out, log)
        path = metrics["checkpoint"]
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        metrics = STAGE_FNS[stage](cfg, out, log)
        path = str(out.resolve())
    out.mkdir(parents=True, exist_ok=True)
    marker = {"stage": stage, "checkpoint": path, "seconds": round(time.time() - start, 1),
              "metrics": {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return marker


def run_pipeline(cfg: RelayConfig, stages: tuple[str, ...] | None = None, force: bool = False,
                 force_stages: tuple[str, ...] = (), log: Callable[[str], object] = print) -> dict[str, dict]:
    """Run ``stages`` in pipeline order; returns each stage's marker.

    A stage that reads a stage redone in this call is redone too (its inputs changed).
    """
    stages = tuple(cfg.pipeline.stages) if stages is None else stages
    unknown = sorted((set(stages) | set(force_stages)) - set(STAGES))
    if unknown:
        raise RunError(f"unknown pipeline stage(s) {unknown}; valid: {', '.join(STAGES)}")
    results, redone = {}, set()
    lock = checkpoint.RunDirLock(cfg.train.run_dir)
    lock.acquire()  # a second pipeline on this run_dir would delete this one's stages
    try:
        for stage in (s for s in STAGES if s in stages):
            again = force or stage in force_stages or any(s in redone for s in needs(cfg, stage))
            if again or read_marker(cfg, stage) is None:
                redone.add(stage)
            results[stage] = run_stage(cfg, stage, force=again, log=log)
    finally:
        lock.release()
    return results
