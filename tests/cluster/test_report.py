"""`relay report` on a synthetic JSONL log, and the console progress line (no terminal needed)."""

from __future__ import annotations

import io
import math

import pytest

from cluster.progress import Progress, format_duration
from cluster.report import make_report, report_command, summarize
from core.metrics import JsonlLogger, flat_key, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEP_TOTAL = flat_key("learner/step_seconds", phase="total")
EVALS = {2: 0.10, 4: 0.30, 6: 0.25, 8: 0.40}


def write_run(run_dir, steps=8, with_losses=True):
    with JsonlLogger(run_dir / "metrics.jsonl") as log:
        for step in range(1, steps + 1):
            values = {
                "reward/mean": 0.1 * step,
                "reward/task_score": 0.05 * step,
                "learner/kl": 0.001 * step,
                "learner/kl_coef": 0.02,
                "rollout/tokens_per_second": 1000.0 * step,
                "sync/seconds": 0.1,
                "sync/bytes": 4e6,
                STEP_TOTAL: 0.4 if step % 2 else 0.6,
            }
            if with_losses:
                values |= {"learner/policy_loss": -0.01 * step, "learner/value_loss": 0.0, "learner/entropy": 1.0}
            if step in EVALS:
                values["eval/task_score"] = EVALS[step]
            log.write(step, values)


def test_report_writes_pngs_and_correct_summary(tmp_path):
    write_run(tmp_path)
    out = make_report(tmp_path)
    for name in ("reward.png", "kl.png", "losses.png", "throughput.png", "sync.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, name

    records = read_jsonl(tmp_path / "metrics.jsonl")
    summary = summarize(records)
    assert summary["total_steps"] == 8
    assert summary["eval_task_score_first"] == 0.10
    assert summary["eval_task_score_last"] == 0.40
    assert summary["eval_task_score_best"] == 0.40 and summary["eval_task_score_best_step"] == 8
    assert summary["eval_task_score_mean_last3"] == pytest.approx((0.30 + 0.25 + 0.40) / 3)
    assert summary["tokens_per_second_mean"] == pytest.approx(4500.0)  # mean of 1000..8000
    assert summary["sync_seconds_mean"] == pytest.approx(0.1)
    assert summary["sync_share_of_step"] == pytest.approx(0.8 / 4.0)  # 8 x 0.1 over 4 x 0.4 + 4 x 0.6
    assert summary["wall_time_seconds"] == pytest.approx(records[-1]["time"] - records[0]["time"])

    text = (out / "summary.txt").read_text()
    assert "total_steps" in text and "0.4" in text and "skipped" not in text


def test_missing_panel_is_skipped_with_a_note(tmp_path):
    write_run(tmp_path, with_losses=False)
    out = make_report(tmp_path)
    assert not (out / "losses.png").exists()
    assert (out / "reward.png").exists()
    assert "skipped losses.png" in (out / "summary.txt").read_text()


def test_missing_or_empty_log_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
        make_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="no steps yet"):
        make_report(tmp_path)
    assert report_command(str(tmp_path)) == 2
    assert "no steps yet" in capsys.readouterr().err


def test_report_command_prints_summary(tmp_path, capsys):
    write_run(tmp_path)
    assert report_command(str(tmp_path)) == 0
    assert "report written to" in capsys.readouterr().out


def test_summary_without_eval_or_step_times(tmp_path):
    with JsonlLogger(tmp_path / "metrics.jsonl") as log:
        log.write(1, {"reward/mean": 0.5})
    summary = summarize(read_jsonl(tmp_path / "metrics.jsonl"))
    assert summary["eval_task_score_last"] is None and summary["sync_share_of_step"] is None
    make_report(tmp_path)  # plots only what exists


# --- progress line ---------------------------------------------------------------------------------

STEP_VALUES = {"reward/mean": 0.41, "reward/task_score": 0.40, "eval/task_score": 0.37, "learner/kl": 0.003,
               "rollout/tokens_per_second": 8900.0, "sync/seconds": 0.08}


def test_progress_line_format():
    stream = io.StringIO()
    progress = Progress(200, started_at=1000.0, stream=stream)
    line = progress.line(12, STEP_VALUES, now=1000.0 + 12 * 1.0)
    assert line == ("step 12/200 | reward 0.41 | train acc 0.40 | eval acc 0.37 | kl 0.003 | tok/s 8,900 "
                    "| sync 0.08s | ETA 3m08s")


def test_progress_prints_the_first_step_and_each_evaluation_when_not_a_tty():
    stream = io.StringIO()
    progress = Progress(10, stream=stream)
    progress.update(1, {"reward/mean": 0.3})
    progress.update(2, {"reward/mean": 0.35})  # neither the first step nor an evaluation: not printed
    progress.update(3, STEP_VALUES)
    progress.update(4, {"reward/mean": 0.5, "eval/task_score": None})
    progress.update(5, {"reward/mean": 0.5, "learner/kl": float("nan"), "eval/task_score": 0.5})
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 1/10", "step 3/10", "step 5/10"]
    assert lines[1].startswith("step 3/10 | reward 0.41 | train acc 0.40 | eval acc 0.37")
    assert "eval acc 0.50" in lines[2]
    assert "kl" not in lines[2] and "tok/s" not in lines[2]  # not finite / not logged this step


def test_progress_line_carries_the_last_evaluation_over():
    progress = Progress(10, stream=io.StringIO())
    progress.line(1, STEP_VALUES, now=1.0)
    assert "eval acc 0.37" in progress.line(2, {"reward/mean": 0.5}, now=2.0)


def test_progress_eta_uses_rate_after_startup():
    progress = Progress(100, started_at=0.0, stream=io.StringIO())
    progress.line(1, {}, now=60.0)  # a slow first step (engine start) ...
    line = progress.line(5, {}, now=64.0)  # ... then 1 s per step
    assert line.endswith("ETA 1m35s")


def test_progress_summary_table():
    progress = Progress(10, started_at=0.0, stream=io.StringIO())
    table = progress.summary({"eval acc (mean of last 3)": "0.65", "steps": "10", "wall time": "5m00s"})
    lines = table.splitlines()
    assert lines[0] == lines[-1] and set(lines[0]) == {"-"}
    assert lines[1] == "eval acc (mean of last 3)  0.65"
    assert lines[3].startswith("wall time") and lines[3].endswith("5m00s")


@pytest.mark.parametrize("seconds,text", [(42, "42s"), (192, "3m12s"), (3900, "1h05m"), (math.nan, "?")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_progress_eta_respects_the_time_limit():
    import io

    from cluster.progress import Progress

    p = Progress(total_steps=1000, started_at=0.0, stream=io.StringIO(), time_limit_s=100.0)
    for step in range(1, 6):
        line = p.line(step, {}, now=float(step))
    # 1 s/step would mean 995 s for the steps left, but the run stops at 100 s: 95 s remain.
    assert line.endswith("ETA 1m35s"), line
