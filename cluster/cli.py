"""``relay``: the command line. Every user mistake ends in one clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from cluster.config import ConfigError, load_config

EXIT_USAGE = 2


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML (default: the embedded default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set generation.num_actors=2 (repeatable)")


def _train(args) -> int:
    from cluster.driver import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    print(f"held-out greedy accuracy: {summary['eval_start']:.3f} at the SFT start -> "
          f"{summary['eval_last3_mean']:.3f} (mean of the last three evaluations), "
          f"{summary['eval_gain_points']:+.1f} points in {summary['rl_seconds']:.0f} s of RL")
    return 0


def _report(args) -> int:
    from cluster.report import report_command

    return report_command(args.run_dir)


def _train_rm(args) -> int:
    from pathlib import Path

    from learner.rm_trainer import train_reward_model

    cfg = load_config(args.config, args.overrides)
    metrics = train_reward_model(cfg.reward_model, Path(args.out))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="RL post-training of language models on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run RL (GRPO/PPO/...) on the configured task")
    _config_args(p)
    p.set_defaults(fn=_train)
    p = sub.add_parser("train-rm", help="train a reward model on preference pairs")
    _config_args(p)
    p.add_argument("--out", default="runs/reward_model", help="output checkpoint directory")
    p.set_defaults(fn=_train_rm)
    p = sub.add_parser("report", help="plots and a summary of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(fn=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cluster.driver import RunError
    from cluster.resources import ResourceError

    try:
        return args.fn(args)
    except (ConfigError, RunError, ResourceError) as e:
        print(f"relay {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"relay {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
