"""One line per training step on the console, and a final summary table.

``step 12/200 | reward 0.41 | train acc 0.40 | eval acc 0.37 | kl 0.003 | tok/s 8,900 | sync 0.08s | ETA 3m12s``

On a terminal the line is redrawn in place (rich live display); elsewhere, as in the job log that
``ray job submit`` streams, a plain line is printed for the first step and for each step with an
evaluation (``eval/task_score``), so a long run's log stays readable (metrics.jsonl has every step).
Fields whose metric the step did not log are left out; the eval score is carried over from the last
evaluation.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from typing import TextIO

# (metric key, label, format) in display order
FIELDS: tuple[tuple[str, str, str], ...] = (
    ("reward/mean", "reward", "{:.2f}"),
    ("reward/task_score", "train acc", "{:.2f}"),
    ("eval/task_score", "eval acc", "{:.2f}"),
    ("learner/kl", "kl", "{:.3g}"),
    ("rollout/tokens_per_second", "tok/s", "{:,.0f}"),
    ("sync/seconds", "sync", "{:.2f}s"),
)
STICKY = ("eval/task_score",)
"""metrics logged only some steps, shown with their last value"""


def format_duration(seconds: float) -> str:
    """``3m12s``, ``1h05m``, ``42s``."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Shows a compact status line per step (printed at the first step and each evaluation when not on a
    terminal); ``summary`` renders the end-of-run table."""

    def __init__(self, total_steps: int, started_at: float | None = None, stream: TextIO | None = None,
                 time_limit_s: float | None = None):
        self.total_steps = total_steps
        self.time_limit_s = time_limit_s
        """a run that stops on time rather than steps: the ETA is the smaller of the two"""
        self.started_at = time.time() if started_at is None else started_at
        self.stream = sys.stderr if stream is None else stream
        self._sticky: dict[str, float] = {}
        self._first_step: tuple[int, float] | None = None
        self._live = None
        self._printed = False
        """a plain line was printed (off a terminal, the first step always prints one)"""
        if getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.live import Live

            self._live = Live("", console=Console(file=self.stream), auto_refresh=False, transient=False)
            self._live.start()

    def line(self, step: int, values: Mapping[str, float], now: float | None = None) -> str:
        """The status line for ``step`` (no side effects besides remembering sticky values)."""
        now = time.time() if now is None else now
        for key in STICKY:
            if values.get(key) is not None:
                self._sticky[key] = values[key]
        shown = {**self._sticky, **{k: v for k, v in values.items() if v is not None}}
        parts = [f"step {step}/{self.total_steps}"]
        for key, label, fmt in FIELDS:
            value = shown.get(key)
            if value is not None and math.isfinite(value):
                parts.append(f"{label} {fmt.format(value)}")
        eta = self._eta(step, now)
        if self.time_limit_s is not None:
            eta = min(eta, max(0.0, self.started_at + self.time_limit_s - now)) if math.isfinite(eta) else eta
        parts.append(f"ETA {format_duration(eta)}")
        return " | ".join(parts)

    def update(self, step: int, values: Mapping[str, float]) -> None:
        text = self.line(step, values)
        if self._live is not None:
            self._live.update(text, refresh=True)
        elif not self._printed or values.get("eval/task_score") is not None:
            print(text, file=self.stream, flush=True)
            self._printed = True

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def summary(self, rows: Mapping[str, str]) -> str:
        """A plain-text two-column table of ``rows``; a "wall time" row is added unless given."""
        rows = dict(rows)
        rows.setdefault("wall time", format_duration(time.time() - self.started_at))
        width = max(len(k) for k in rows)
        rule = "-" * (width + 2 + max(len(str(v)) for v in rows.values()))
        body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows.items())
        return f"{rule}\n{body}\n{rule}"

    def _eta(self, step: int, now: float) -> float:
        # Rate measured from the first step seen once a few steps have passed, so start-up time
        # (engine load, SFT warm start) is not extrapolated over the whole run.
        if self._first_step is None:
            self._first_step = (step, now)
        first_step, first_time = self._first_step
        remaining = self.total_steps - step
        if step - first_step >= 3:
            return (now - first_time) / (step - first_step) * remaining
        return (now - self.started_at) / step * remaining if step > 0 else math.nan
