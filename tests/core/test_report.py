"""metrics.report_to: TensorBoard event files read back, key sanitising, the config's and a missing package's
messages; W&B (offline) and MLflow (a local file store) where their packages are installed."""

from __future__ import annotations

import math

import pytest

from cluster.config import ConfigError, load_config
from core.report import ReportError, RunReporters, check_available, tracker_key

STEPS = {1: {"learner/kl": 0.5, "rollout/dropped_total{reason=stale}": 2.0, "eval/task_score": None},
         2: {"learner/kl": 0.25, "rollout/dropped_total{reason=stale}": 3.0, "reward/mean": math.nan},
         3: {"learner/kl": 0.125, "eval/task_score": 0.75, "learner/step_seconds{phase=update}": 1.5}}
CONFIG = {"train": {"steps": 3}, "metrics": {"report_to": ["tensorboard"]}}


def test_tracker_keys_keep_namespaces_and_drop_tag_syntax():
    assert tracker_key("learner/kl") == "learner/kl"
    assert tracker_key("rollout/dropped_total{reason=stale}") == "rollout/dropped_total/reason_stale"
    assert tracker_key("a/b{x=1,y=z w}") == "a/b/x_1/y_z w"
    assert tracker_key("a/b{x=<1>}") == "a/b/x__1_"


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_every_finite_value(tmp_path):
    pytest.importorskip("tensorboard")
    with RunReporters(["tensorboard"], tmp_path, CONFIG) as reporters:
        for step, metrics in STEPS.items():
            reporters.write(step, metrics)
    got = scalars(tmp_path / "tensorboard")
    assert got == {
        "learner/kl": [(1, 0.5), (2, 0.25), (3, 0.125)],
        "rollout/dropped_total/reason_stale": [(1, 2.0), (2, 3.0)],
        "eval/task_score": [(3, 0.75)],  # None at step 1 is left out
        "learner/step_seconds/phase_update": [(3, 1.5)],
    }  # reward/mean was NaN: left out


def test_tensorboard_resume_discards_steps_after_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    with RunReporters(["tensorboard"], tmp_path, CONFIG) as reporters:
        for step in (1, 2, 3):
            reporters.write(step, {"learner/kl": float(step)})
    with RunReporters(["tensorboard"], tmp_path, CONFIG, resumed_at=2) as reporters:  # step 3 is redone
        reporters.write(3, {"learner/kl": 30.0})
    assert scalars(tmp_path / "tensorboard")["learner/kl"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_nothing_named_writes_nothing(tmp_path):
    with RunReporters([], tmp_path) as reporters:
        reporters.write(1, {"learner/kl": 0.5})
    assert list(tmp_path.iterdir()) == []


def test_unknown_tracker_fails_the_config_naming_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"metrics.report_to: unknown tracker 'tensorbord' \(allowed: "
                                          r"tensorboard, wandb, mlflow\)"):
        load_config(overrides=["metrics.report_to=[tensorbord]"])
    assert load_config(overrides=["metrics.report_to=tensorboard"]).metrics.report_to == ["tensorboard"]
    assert load_config().metrics.report_to == []


def test_missing_package_names_the_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ReportError, match=r"names mlflow, but its package is not installed here; run: pip install "
                                          r"mlflow-skinny"):
        check_available(["mlflow"])


def test_wandb_offline_run(tmp_path):
    pytest.importorskip("wandb")
    with RunReporters(["wandb"], tmp_path, CONFIG) as reporters:
        for step, metrics in STEPS.items():
            reporters.write(step, metrics)
        run = reporters._writers[0].run
        assert run.summary["learner/kl"] == 0.125
        assert run.summary["rollout/dropped_total/reason_stale"] == 3.0
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mlflow_local_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    with RunReporters(["mlflow"], tmp_path, CONFIG) as reporters:
        for step, metrics in STEPS.items():
            reporters.write(step, metrics)
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("relay").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3"
    history = client.get_metric_history(run.info.run_id, "rollout/dropped_total/reason_stale")
    assert [(m.step, m.value) for m in history] == [(1, 2.0), (2, 3.0)]
