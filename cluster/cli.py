"""``relay``: the command line. Every user mistake ends in one clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, load_config

EXIT_USAGE = 2


def _resume_arg(p: argparse.ArgumentParser, extra: str = "") -> None:
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (default: train.run_dir) from its latest complete checkpoint"
                   + extra)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set generation.num_actors=2 (repeatable)")


def _train(args) -> int:
    from cluster.config import resume_config
    from cluster.train import train

    if args.resume is None:
        cfg = load_config(args.config, args.overrides)
    else:  # RUN_DIR, or train.run_dir of the config (its default without one)
        run_dir = args.resume or load_config(args.config, args.overrides).train.run_dir
        cfg = resume_config(run_dir, args.config, args.overrides)
    summary = train(cfg, resume=args.resume is not None)
    if not summary:
        return 0
    if "interrupted" in summary:
        print(f"stopped by {summary['interrupted']} at step {summary['steps']}; checkpoint {summary['checkpoint']}; "
              f"continue with: relay train --resume {cfg.train.run_dir}")
        return 128 + (15 if summary["interrupted"] == "SIGTERM" else 2)
    print(f"held-out score: {summary['eval_start']:.3f} at the start -> "
          f"{summary['eval_last3_mean']:.3f} (mean of the last three evaluations), "
          f"{summary['eval_gain_points']:+.1f} points in {summary['rl_seconds']:.0f} s of RL")
    return 0


def _dpo(args) -> int:
    from cluster.config import resume_config
    from cluster.offline import train_dpo, train_rwr

    if args.resume is None:
        cfg = load_config(args.config, args.overrides)
    else:
        run_dir = args.resume or load_config(args.config, args.overrides).train.run_dir
        cfg = resume_config(run_dir, args.config, args.overrides)
    s = (train_rwr if args.command == "rwr" else train_dpo)(cfg, resume=args.resume is not None)
    print(f"{s['algorithm']}: held-out score {s['eval_start']:.3f} at the start -> {s['eval_last3_mean']:.3f} (mean "
          f"of the last three evaluations), {s['eval_gain_points']:+.1f} points in {s['train_seconds']:.0f} s of "
          f"training ({s['steps']} steps, {s['pairs']} {'records' if args.command == 'rwr' else 'pairs'})")
    return 0


def _report(args) -> int:
    from cluster.report import report_command

    return report_command(args.run_dir)


def _train_rm(args) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from cluster.driver import RunError, resolve_policy
    from cluster.pipeline import rm_problems
    from learner.rm_trainer import ENSEMBLE_FILE, train_reward_model
    from reward_service.models import META_FILE

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)  # checked before hours of training, and never over someone else's files
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunError(f"--out {args.out!r}: {str(existing)!r} is a file; give a directory for the reward-model "
                       "checkpoint (created if missing)")
    if out.is_dir() and any(out.iterdir()) and not ((out / META_FILE).is_file() or (out / ENSEMBLE_FILE).is_file()):
        raise RunError(f"--out {args.out!r} holds files that are not a reward-model checkpoint "
                       f"({', '.join(sorted(p.name for p in out.iterdir())[:5])}); give a new or empty directory "
                       "(a reward-model checkpoint there is replaced)")
    policy = resolve_policy(cfg)  # the SFT policy the reward model starts from and samples pairs with
    problems = rm_problems(cfg, AutoTokenizer.from_pretrained(cfg.model.tokenizer or policy))
    metrics = train_reward_model(cfg.reward_model, out, problems=problems, policy_path=policy,
                                 max_new_tokens=cfg.generation.max_tokens, temperature=cfg.generation.temperature)
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return 0


def _pipeline(args) -> int:
    import json

    from cluster.pipeline import run_pipeline

    cfg = load_config(args.config, args.overrides)
    stages = tuple(args.stage) if args.stage else None
    results = run_pipeline(cfg, stages, force=args.force, force_stages=tuple(args.force_stage))
    for stage, marker in results.items():
        print(f"{stage}: {marker['checkpoint']} " + json.dumps(
            {k: round(v, 4) if isinstance(v, float) else v for k, v in marker["metrics"].items()
             if isinstance(v, int | float)}))
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from cluster.driver import RunError, resolve_policy
    from cluster.evaluation import evaluate_checkpoints

    cfg = load_config(args.config, args.overrides)
    for flag, given in (("--policy", args.policy), ("--reference", args.reference), ("--rm", args.rm)):
        path = Path(given) if given is not None else None
        if path is not None and not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "is a file" if not path.is_dir() else "has no config.json"
            raise RunError(f"{flag} {given!r} {what}: give a checkpoint directory written by relay (save_pretrained), "
                           "e.g. runs/<name>/checkpoints/final")
    if args.out and (Path(args.out).is_dir() or not Path(args.out).absolute().parent.is_dir()):
        what = "is a directory" if Path(args.out).is_dir() else "is in a directory that does not exist"
        raise RunError(f"--out {args.out!r} {what}: give the path of a JSON file to write")
    reference = args.reference or resolve_policy(cfg)
    metrics = evaluate_checkpoints(cfg, args.policy, reference, args.rm)
    text = json.dumps({k: round(v, 4) for k, v in metrics.items()}, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="RL post-training of language models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run RL (GRPO/PPO/...) on the configured task")
    _config_args(p)
    _resume_arg(p, ", with its own config unless --config is given; --set may change budgets and placement")
    p.set_defaults(fn=_train)
    p = sub.add_parser("dpo", help="offline preference optimisation (dpo.loss: dpo | ipo | cdpo) on the learner, from "
                                    "dpo.preferences_path or pairs built from the policy's own samples")
    _config_args(p)
    _resume_arg(p)
    p.set_defaults(fn=_dpo)
    p = sub.add_parser("rwr", help="offline reward-weighted regression on the learner, from rwr.path records "
                                    "{prompt, response, reward} or the start policy's own samples scored by the reward")
    _config_args(p)
    _resume_arg(p)
    p.set_defaults(fn=_dpo)
    p = sub.add_parser("train-rm", help="train a reward model on preference pairs (from model.path, or the "
                                         "embedded SFT policy, by default)")
    _config_args(p)
    p.add_argument("--out", default="runs/reward_model", help="output checkpoint directory")
    p.set_defaults(fn=_train_rm)
    p = sub.add_parser("report", help="plots and a summary of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_report)
    p = sub.add_parser("pipeline", help="SFT -> reward model -> RL, each stage checkpointed under run_dir/<stage>/")
    _config_args(p)
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="run only this stage: sft, rm, rl or dpo (repeatable; default: pipeline.stages)")
    p.add_argument("--force", action="store_true", help="redo stages that already finished")
    p.add_argument("--force-stage", action="append", default=[], metavar="NAME",
                   help="redo this stage (and the later ones run with it) even if it finished (repeatable)")
    p.set_defaults(fn=_pipeline)
    p = sub.add_parser("eval", help="held-out evaluation of a policy checkpoint vs a reference (no Ray)")
    _config_args(p)
    p.add_argument("--policy", required=True, help="policy checkpoint directory")
    p.add_argument("--reference", help="reference checkpoint (default: model.path, or the embedded SFT policy)")
    p.add_argument("--rm", help="reward-model checkpoint for the reward columns (default: the configured reward)")
    p.add_argument("--out", help="also write the metrics as JSON here")
    p.set_defaults(fn=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.checkpoint import CheckpointError
    from cluster.driver import RunError
    from cluster.fleet import FleetError
    from cluster.resources import ResourceError
    from core.data import DataError
    from core.report import ReportError

    try:
        return args.fn(args)
    except (ConfigError, RunError, ResourceError, DataError, CheckpointError, FleetError, ReportError) as e:
        print(f"relay {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if e.filename is None:  # not about one path (permissions, a file in a directory's place): keep the traceback
            raise
        print(f"relay {args.command}: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
