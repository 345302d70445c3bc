"""Objectives side by side on the embedded default: held-out gain and steps, 5 minutes of RL each.

    python benchmarks/compare_objectives.py [--minutes 5] [--only grpo,gspo] [--out benchmarks/results/objectives]

Every cell (objective, seed) is one `relay train` from the same cached SFT start, run one after another
(never two at once: on 2 cores they would slow each other). A cell whose run directory already has a
summary.json is skipped, so the table can be finished over several sittings. Writes `results.json`,
`results.md` (the README's table, also spliced into README.md between its markers) and `gain_vs_time.png`
(held-out score gain against wall time, one line per run).

Gain = 100 * (mean of the last three held-out evaluations - the start). Objectives whose difference lies
inside the spread of their seeds are not ranked; the table says which pairs are inside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name -> (overrides on the embedded default, what it is)
OBJECTIVES: dict[str, tuple[list[str], str]] = {
    "grpo": ([], "GRPO (Shao et al. 2024): group-normalised advantage, PPO clip, token-mean"),
    "drgrpo": (["algorithm.name=drgrpo", "algorithm.loss_agg=seq-mean-token-sum-norm"],
               "Dr.GRPO (Liu et al. 2025): no std normalisation, constant length normaliser"),
    "rloo": (["algorithm.name=rloo"], "RLOO (Ahmadian et al. 2024): leave-one-out baseline"),
    "reinforce_pp": (["algorithm.name=reinforce_pp", "algorithm.kl_in=reward", "algorithm.kl_coef=0.01",
                      "algorithm.drop_uniform_groups=false"],
                     "REINFORCE++ (Hu 2025): KL in the reward per token, advantages whitened over the batch"),
    "dapo": (["--config", "cluster/examples/dapo.yaml"],
             "DAPO (Yu et al. 2025): clip-higher 0.28, dynamic sampling, token-mean, overlong shaping"),
    "gspo": (["algorithm.policy_loss=gspo", "algorithm.clip_low=0.0003", "algorithm.clip_high=0.0004",
              "algorithm.loss_agg=seq-mean-token-mean"],
             "GSPO (Zheng et al. 2025): sequence-level ratio, clip 3e-4/4e-4"),
    "cispo": (["algorithm.policy_loss=cispo", "algorithm.clip_low=0.99", "algorithm.clip_high=4.0"],
              "CISPO (MiniMax 2025): clipped, detached IS weight on every token; no lower bound (0.99)"),
}
SECOND_SEED = ("grpo", "dapo", "gspo", "cispo")


def cells(only: set[str] | None) -> list[tuple[str, int]]:
    out = [(name, 0) for name in OBJECTIVES] + [(name, 1) for name in SECOND_SEED]
    return [(n, s) for n, s in out if only is None or n in only]


def run_cell(name: str, seed: int, minutes: float, out: Path) -> Path:
    run_dir = out / f"{name}-seed{seed}"
    if (run_dir / "summary.json").exists():
        print(f"{name} seed {seed}: done already ({run_dir})")
        return run_dir
    overrides, _ = OBJECTIVES[name]
    args = [a for o in overrides for a in (["--set", o] if "=" in o and not o.startswith("--") else [o])]
    sets = [f"train.time_limit_s={minutes * 60:g}", f"train.run_dir={run_dir}", f"train.seed={seed}",
            f"generation.seed={seed}", "metrics.progress=false", "metrics.prometheus=false",
            "reward.http_enabled=false"]
    cmd = [sys.executable, "-m", "cluster.cli", "train", *args, *(a for o in sets for a in ("--set", o))]
    print(f"{name} seed {seed}: {' '.join(cmd[3:])}", flush=True)
    started = time.time()
    log = (out / f"{name}-seed{seed}.log").open("w")
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed ({proc.returncode}); see {out / f'{name}-seed{seed}.log'}")
    print(f"{name} seed {seed}: {time.time() - started:.0f} s", flush=True)
    return run_dir


def read_cell(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval/task_score" in r]
    t0 = evals[0]["time"]
    return {"steps": summary["steps"], "start": summary["eval_start"], "last3": summary["eval_last3_mean"],
            "gain": summary["eval_gain_points"], "best": summary["eval_best"],
            "curve": [(r["time"] - t0, 100 * (r["eval/task_score"] - evals[0]["eval/task_score"])) for r in evals]}


def table(results: dict[str, dict[int, dict]], minutes: float) -> str:
    rows = [f"| objective | what | steps in {minutes:g} min | start | gain, points (per seed) | mean gain |",
            "|---|---|---|---|---|---|"]
    spread = {}
    for name, by_seed in results.items():
        gains = [by_seed[s]["gain"] for s in sorted(by_seed)]
        spread[name] = (min(gains), max(gains))
        steps = ", ".join(str(by_seed[s]["steps"]) for s in sorted(by_seed))
        rows.append(f"| {name} | {OBJECTIVES[name][1]} | {steps} "
                    f"| {by_seed[min(by_seed)]['start']:.3f} | {', '.join(f'{g:+.1f}' for g in gains)} "
                    f"| {sum(gains) / len(gains):+.1f} |")
    seeded = {n: r for n, r in spread.items() if len(results[n]) > 1}
    if not seeded:
        rows.append("")
        rows.append("One seed per objective so far: the seed spread is not measured yet, so this is not a ranking "
                    "(the second seeds of grpo, dapo, gspo and cispo are still to run).")
    if seeded:
        widest = max(hi - lo for lo, hi in seeded.values())
        rows.append("")
        rows.append(f"Seed spread (two seeds): up to {widest:.1f} points "
                    f"({', '.join(f'{n} {hi - lo:.1f}' for n, (lo, hi) in seeded.items())}). Differences between "
                    f"objectives smaller than that are not a ranking.")
    return "\n".join(rows)


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, by_seed) in enumerate(results.items()):
        for seed, cell in sorted(by_seed.items()):
            xs, ys = zip(*cell["curve"], strict=True)
            ax.plot(xs, ys, color=colors[i % len(colors)], linestyle="-" if seed == 0 else "--",
                    label=name if seed == min(by_seed) else None)
    ax.set_xlabel("wall time since the first evaluation, s")
    ax.set_ylabel("held-out score gain, points")
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend()
    ax.set_title("Objectives on the embedded default (dashed: second seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def splice_readme(text: str) -> None:
    readme = REPO / "README.md"
    body = readme.read_text()
    start, end = "<!-- objectives table", "<!-- end objectives table -->"
    if start not in body:
        return
    s = body.index("-->", body.index(start)) + len("-->")
    readme.write_text(body[:s] + "\n" + text + "\n" + body[body.index(end):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--only", help="comma-separated objectives (default: all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "objectives"))
    parser.add_argument("--report-only", action="store_true", help="write the table from the runs done so far")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - set(OBJECTIVES)
    if unknown:
        raise SystemExit(f"unknown objective(s) {sorted(unknown)}; known: {', '.join(OBJECTIVES)}")
    if not args.report_only:
        for name, seed in cells(only):
            run_cell(name, seed, args.minutes, out)
    results: dict[str, dict[int, dict]] = {}
    for name, seed in cells(None):
        run_dir = out / f"{name}-seed{seed}"
        if (run_dir / "summary.json").exists():
            results.setdefault(name, {})[seed] = read_cell(run_dir)
    if not results:
        raise SystemExit("no finished runs yet")
    text = table(results, args.minutes)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(text + "\n")
    plot(results, out / "gain_vs_time.png")
    splice_readme(text)
    print(text)


if __name__ == "__main__":
    main()
