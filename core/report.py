"""Every step's metrics to the experiment trackers named in ``metrics.report_to``, beside the JSONL log.

``tensorboard`` writes event files to ``run_dir/tensorboard`` (``tensorboard --logdir run_dir``), ``wandb``
an offline run under ``run_dir/wandb`` (upload later with ``wandb sync``), ``mlflow`` a local file store at
``run_dir/mlruns`` (``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri run_dir/mlruns``). The
packages are optional and imported only when named; a missing one fails at the start with the pip install
that brings it.

Metric keys keep their namespaces (``learner/kl``); the tags of a flat key become one more path segment,
``rollout/dropped_total{reason=stale}`` -> ``rollout/dropped_total/reason_stale``, because MLflow rejects
``{``, ``=`` and ``,``, and one spelling in every tracker is easier to search.

Simplifications: non-finite values are left out (as in Prometheus; the JSONL log writes them as null); a
resumed run opens a new W&B and MLflow run, while TensorBoard discards what an earlier process wrote after
the step the run resumes from (``resumed_at``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}
"""tracker -> (the module it imports, the pip package that installs it)"""
_TAGGED = re.compile(r"^(?P<base>[^{]+)\{(?P<tags>[^}]*)\}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-./ :]")  # what MLflow allows in a metric or param name


class ReportError(RuntimeError):
    """A tracker named in metrics.report_to cannot be used (its package is missing)."""


def tracker_key(key: str) -> str:
    """The name a tracker is given for the flat metric key ``key``:
    ``"rollout/dropped_total{reason=stale}"`` -> ``"rollout/dropped_total/reason_stale"``."""
    match = _TAGGED.match(key)
    if match is not None:
        tags = [t.replace("=", "_", 1) for t in match["tags"].split(",") if t]
        key = "/".join([match["base"], *tags])
    return _UNSAFE.sub("_", key)


def check_available(report_to: list[str]) -> None:
    """Raise ReportError naming the pip install to run if a tracker's package is missing (call it before
    minutes of start-up; ``RunReporters`` checks again)."""
    missing = [name for name in report_to if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        pip = " ".join(PACKAGES[name][1] for name in missing)
        raise ReportError(f"metrics.report_to names {', '.join(missing)}, but its package is not installed here; "
                          f"run: pip install {pip} (or pip install 'relay-rl[report]' for all three), or remove "
                          "it from metrics.report_to")


def _finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, numbers.Real) and math.isfinite(value):  # numpy scalars too
            out[tracker_key(key)] = float(value)
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed_at: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an earlier process wrote after the checkpoint are hidden, as the JSONL log is cut
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), flush_secs=10,
                                    purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed_at: int | None):
        import wandb

        # console="off": W&B would otherwise wrap stdout/stderr, under the progress line
        self.run = wandb.init(mode="offline", dir=str(run_dir), project="relay", name=run_dir.resolve().name,
                              config=dict(config), settings=wandb.Settings(console="off", quiet=True))

    def write(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step, commit=True)  # a step's metrics come in one call: write its row now

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch (and params: 100)

    def __init__(self, run_dir: Path, config: Mapping[str, Any], resumed_at: int | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses a file store unless this is set ("maintenance mode"); a sqlite store would need the
        # full mlflow package (SQLAlchemy, alembic) where mlflow-skinny writes a file store.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        experiment = self.client.get_experiment_by_name("relay")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("relay")
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
        params = [Param(tracker_key(k), str(v)[:500]) for k, v in _flatten(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, value, now, step) for key, value in values.items()]
        for i in range(0, len(batch), self.MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i:i + self.MAX_BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_WRITERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


class RunReporters:
    """The trackers of one run: ``write`` each step's metrics, ``close`` at the end (also as a context manager).

    ``config`` is the run's configuration as a dict (``cfg.model_dump()``): W&B keeps it as the run config,
    MLflow as params (flattened, ``train.steps``), TensorBoard as a text summary. ``resumed_at`` is the step
    of the checkpoint a resumed run continues from. With ``report_to`` empty, nothing is imported or written.
    """

    def __init__(self, report_to: list[str], run_dir: str | Path, config: Mapping[str, Any] | None = None,
                 resumed_at: int | None = None):
        check_available(report_to)
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._writers: list[Any] = []
        try:
            for name in report_to:
                self._writers.append(_WRITERS[name](run_dir, config or {}, resumed_at))
        except BaseException:
            self.close()
            raise

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write ``metrics`` (flat keys as in the JSONL log; None and non-finite values are skipped) at ``step``."""
        if not self._writers:
            return
        values = _finite(metrics)
        for writer in self._writers:
            writer.write(step, values)

    def close(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.close()

    def __enter__(self) -> RunReporters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
