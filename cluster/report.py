"""``relay report RUN_DIR``: plots and a summary from ``RUN_DIR/metrics.jsonl``.

Writes ``RUN_DIR/report/*.png`` (one figure per panel) and ``RUN_DIR/report/summary.txt``. A panel
whose metrics the run never logged is skipped with a note in the summary, so reports of runs
without a critic, KL penalty or evaluation still work.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from core.metrics import flat_key, read_jsonl

STEP_TOTAL = flat_key("learner/step_seconds", phase="total")


@dataclass(frozen=True)
class Figure:
    filename: str
    title: str
    axes: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    """one entry per subplot: (y label, ((metric key, legend), ...))"""


FIGURES = (
    Figure("reward.png", "Reward and task score", (
        ("reward", (("reward/mean", "train reward mean"), ("eval/reward_mean", "eval reward mean"))),
        ("true task score", (("reward/task_score", "train task score"), ("eval/task_score", "eval task score"))),
    )),
    Figure("kl.png", "KL", (
        ("KL", (("learner/kl", "KL(policy||ref)"),)),
        ("coefficient", (("learner/kl_coef", "KL coef"),)),
    )),
    Figure("losses.png", "Losses", (
        ("loss", (("learner/policy_loss", "policy"), ("learner/value_loss", "value"))),
        ("entropy", (("learner/entropy", "entropy"),)),
    )),
    Figure("throughput.png", "Generation throughput", (
        ("tokens/s", (("rollout/tokens_per_second", "tokens/s"),)),
    )),
    Figure("preference.png", "Preference optimisation (relay dpo)", (
        ("loss", (("offline/loss", "train"), ("eval/loss_heldout", "held-out"))),
        ("implicit reward", (("offline/chosen_reward", "chosen"), ("offline/rejected_reward", "rejected"),
                             ("eval/margin_heldout", "held-out margin"))),
        ("accuracy", (("offline/accuracy", "train pairs"), ("eval/accuracy_heldout", "held-out pairs"))),
        ("held-out score", (("eval/task_score", "greedy task score"),)),
    )),
    Figure("sync.png", "Weight sync", (
        ("seconds", (("sync/seconds", "sync"), ("sync/publish_seconds", "publish"),
                     ("sync/load_seconds", "load"), (STEP_TOTAL, "learner step"))),
        ("bytes", (("sync/bytes", "bytes per version"),)),
    )),
)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that logged a finite ``key``."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if value is not None and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def load_records(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        what = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise ValueError(f"run directory {str(run_dir)!r} {what}: pass the directory a `relay train` run wrote "
                         f"(it holds metrics.jsonl), e.g. `relay report runs/<name>`")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass the run directory a `relay train` run wrote "
                         f"(it holds metrics.jsonl), e.g. `relay report runs/<name>`")
    try:
        records = [r for r in read_jsonl(path) if isinstance(r, dict) and "step" in r]
        records.sort(key=lambda r: r["step"])  # a background evaluation is logged after later steps
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); is it a relay metrics "
                         "log?") from None
    if not records:
        raise ValueError(f"{path} holds no steps yet: wait for the run to finish a step, then rerun the report")
    return records


def plot_figure(figure: Figure, records: list[dict], out_dir: Path) -> Path | None:
    """Draw ``figure``; None when none of its metrics were logged. Subplots without data are dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_data = []
    for ylabel, lines in figure.axes:
        drawn = [(legend, *series(records, key)) for key, legend in lines]
        drawn = [d for d in drawn if d[1]]
        if drawn:
            axes_data.append((ylabel, drawn))
    if not axes_data:
        return None
    fig, axes = plt.subplots(len(axes_data), 1, figsize=(8, 3 * len(axes_data)), sharex=True, squeeze=False)
    for ax, (ylabel, drawn) in zip(axes[:, 0], axes_data, strict=True):
        for legend, steps, values in drawn:
            ax.plot(steps, values, label=legend, marker="." if len(steps) < 50 else None)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[0, 0].set_title(figure.title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = out_dir / figure.filename
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(records: list[dict]) -> dict[str, float | int | None]:
    """The run's headline numbers; None where the run did not log what a number needs."""
    eval_steps, evals = series(records, "eval/task_score")
    times = [r["time"] for r in records if r.get("time") is not None]
    _, sync = series(records, "sync/seconds")
    sync_share = None
    paired = [(r["sync/seconds"], r[STEP_TOTAL]) for r in records
              if r.get("sync/seconds") is not None and r.get(STEP_TOTAL)]
    if paired:
        sync_share = sum(s for s, _ in paired) / sum(t for _, t in paired)
    best = max(range(len(evals)), key=evals.__getitem__) if evals else None
    return {
        "total_steps": max(r["step"] for r in records),
        "wall_time_seconds": max(times) - min(times) if times else None,
        "eval_task_score_first": evals[0] if evals else None,
        "eval_task_score_last": evals[-1] if evals else None,
        "eval_task_score_best": evals[best] if best is not None else None,
        "eval_task_score_best_step": eval_steps[best] if best is not None else None,
        "eval_task_score_mean_last3": _mean(evals[-3:]),
        "tokens_per_second_mean": _mean(series(records, "rollout/tokens_per_second")[1]),
        "sync_seconds_mean": _mean(sync),
        "sync_share_of_step": sync_share,
    }


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "n/a (not logged)"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def make_report(run_dir: Path) -> Path:
    """Write the report for ``run_dir`` and return the report directory."""
    run_dir = Path(run_dir)
    records = load_records(run_dir)
    out_dir = run_dir / "report"
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, and the report is written into a directory of that name; move the "
                         "file away, then rerun")
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = []
    for figure in FIGURES:
        if plot_figure(figure, records, out_dir) is None:
            keys = sorted({key for _, lines in figure.axes for key, _ in lines})
            notes.append(f"skipped {figure.filename}: the log has none of {', '.join(keys)}")
    summary = summarize(records)
    width = max(len(k) for k in summary)
    lines = [f"run: {run_dir}", *(f"{k.ljust(width)}  {_fmt(v)}" for k, v in summary.items())]
    (out_dir / "summary.txt").write_text("\n".join(lines + [""] + notes) + "\n")
    return out_dir


def report_command(run_dir: str) -> int:
    """Entry point for ``relay report RUN_DIR``: 0 on success, 2 with a message on stderr otherwise."""
    try:
        out_dir = make_report(Path(run_dir))
    except (ValueError, OSError) as err:  # OSError: e.g. a run directory we may not read or write
        print(f"relay report: error: {err}", file=sys.stderr)
        return 2
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"report written to {out_dir}")
    return 0
