"""The metrics registry, the sink without Ray, the JSONL log, and the dashboard/alerts against the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from core.metrics import METRICS, JsonlLogger, MetricSink, flat_key, lookup, markdown_table, read_jsonl, split_key

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relay.json"
ALERTS = DEPLOY / "alerts.yml"

REQUIRED = {
    "rollout/generated_tokens_total": ("counter", ("actor_id",)),
    "rollout/generation_seconds": ("histogram", ("actor_id",)),
    "rollout/prompt_length_tokens": ("histogram", ()),
    "rollout/response_length_tokens": ("histogram", ()),
    "rollout/tokens_per_second": ("gauge", ()),
    "rollout/staleness_versions": ("gauge", ()),
    "rollout/queue_depth": ("gauge", ()),
    "rollout/samples_total": ("counter", ()),
    "reward/latency_seconds": ("histogram", ()),
    "reward/mean": ("gauge", ()),
    "reward/std": ("gauge", ()),
    "reward/task_score": ("gauge", ()),
    "reward/errors_total": ("counter", ()),
    "reward/excluded_total": ("counter", ()),
    "reward/truncated_total": ("counter", ()),
    "learner/step_seconds": ("gauge", ("phase",)),
    "learner/tokens_trained_total": ("counter", ()),
    "learner/steps_total": ("counter", ()),
    "sync/seconds": ("gauge", ()),
    "sync/bytes": ("gauge", ()),
    "sync/policy_version": ("gauge", ("actor_id",)),
    "sync/publish_seconds": ("gauge", ()),
    "sync/load_seconds": ("gauge", ()),
    "eval/task_score": ("gauge", ()),
    "eval/reward_mean": ("gauge", ()),
    "system/heartbeat_timestamp_seconds": ("gauge", ()),
    "system/actor_restarts_total": ("counter", ("actor_id",)),
}
LEARNER_GAUGES = ["policy_loss", "value_loss", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl",
                  "grad_norm", "explained_variance", "advantage_mean", "advantage_std", "return_mean", "lr"]


def test_registry_has_the_agreed_metrics():
    for key, (kind, tags) in REQUIRED.items():
        assert METRICS[key].kind == kind, key
        assert METRICS[key].tag_keys == tags, key
    for name in LEARNER_GAUGES:
        assert METRICS[f"learner/{name}"].kind == "gauge"


def test_prometheus_names_follow_the_scheme():
    assert METRICS["learner/kl"].prometheus_name == "relay_learner_kl"
    assert METRICS["rollout/samples_total"].exported_name == "ray_relay_rollout_samples_total"
    names = [spec.prometheus_name for spec in METRICS.values()]
    assert len(set(names)) == len(names)
    for spec in METRICS.values():
        assert re.fullmatch(r"relay_[a-z0-9_]+", spec.prometheus_name)
        assert "policy_version" not in spec.tag_keys


def test_unknown_key_names_it_and_suggests_close_ones():
    with pytest.raises(KeyError) as err:
        MetricSink("learner").log({"learner/kll": 1.0})
    assert "learner/kll" in str(err.value) and "learner/kl" in str(err.value)


def test_sink_without_ray_validates_and_records_nothing():
    sink = MetricSink("generation", default_tags={"actor_id": "3"})
    sink.log({"rollout/generated_tokens_total": 120, "rollout/tokens_per_second": 9000.0})
    sink.log({"rollout/generated_tokens_total": 0})  # a zero increment is dropped, not an error
    sink.observe_many("rollout/response_length_tokens", [3, 4, 5])
    sink.heartbeat()
    sink.log({"learner/step_seconds{phase=update}": 0.2})
    sink.log({"learner/step_seconds": 0.3, "learner/kl": 0.01}, tags={"phase": "total"})
    sink.log({"reward/mean": float("nan")})  # non-finite values are skipped


def test_sink_rejects_misuse():
    with pytest.raises(ValueError, match="component"):
        MetricSink("trainer")
    sink = MetricSink("learner")
    with pytest.raises(ValueError, match="phase"):
        sink.log({"learner/step_seconds": 1.0})
    with pytest.raises(ValueError, match="declared by none"):
        sink.log({"learner/kl": 1.0}, tags={"phase": "update"})
    with pytest.raises(ValueError, match="actor_id"):
        sink.log({"sync/policy_version": 3})
    with pytest.raises(ValueError, match="cannot decrease"):
        sink.log({"learner/steps_total": -1})
    with pytest.raises(TypeError, match="histogram"):
        sink.observe_many("learner/kl", [1.0])
    with pytest.raises(ValueError, match="component"):
        sink.log({"sync/policy_version": 3}, tags={"actor_id": "0", "component": "x"})


def test_flat_keys_round_trip():
    key = flat_key("learner/step_seconds", phase="update")
    assert key == "learner/step_seconds{phase=update}"
    assert split_key(key) == ("learner/step_seconds", {"phase": "update"})
    assert split_key("learner/kl") == ("learner/kl", {})
    with pytest.raises(KeyError):
        flat_key("learner/nope", phase="x")


def test_jsonl_appends_and_reads_back(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    with JsonlLogger(path) as log:
        log.write(1, {"reward/mean": 0.5, "learner/kl": float("nan")})
    with JsonlLogger(path) as log:  # a second logger appends, never truncates
        log.write(2, {"reward/mean": 0.75, flat_key("learner/step_seconds", phase="total"): 0.4})
    records = read_jsonl(path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["learner/kl"] is None and records[1]["reward/mean"] == 0.75
    assert records[1]["learner/step_seconds{phase=total}"] == 0.4
    assert all(isinstance(r["time"], float) for r in records)
    with path.open("a") as f:
        f.write('{"step": 3, "rew')  # a writer killed mid-line
    assert len(read_jsonl(path)) == 2
    with pytest.raises(KeyError):
        JsonlLogger(path).write(3, {"reward/meen": 1.0})
    with pytest.raises(ValueError, match="reserved"):
        JsonlLogger(path).write(3, {"step": 1.0})


def test_lookup_returns_spec():
    assert lookup("sync/bytes").kind == "gauge"


# --- deploy/ is checked against the registry -------------------------------------------------------

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exported_names() -> set[str]:
    """Every series name a Prometheus scraping Ray will see for the registered metrics."""
    names = set()
    for spec in METRICS.values():
        names.add(spec.exported_name)
        if spec.kind == "histogram":
            names.update(spec.exported_name + suffix for suffix in _HISTOGRAM_SUFFIXES)
    return names


def relay_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bray_relay_[a-zA-Z0-9_]+", expr))


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows included."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return found


def test_dashboard_exprs_use_registered_metrics():
    exprs = dashboard_exprs()
    assert len(exprs) >= 12
    known = exported_names()
    for title, expr in exprs:
        names = relay_names_in(expr)
        assert names, f"panel {title!r}: expr {expr!r} uses no ray_relay_ metric"
        assert names <= known, f"panel {title!r}: unknown metric(s) {sorted(names - known)} in {expr!r}"
        for name in names:
            if name.endswith("_bucket"):
                assert "histogram_quantile" in expr, f"panel {title!r}: {name} outside histogram_quantile"


def test_dashboard_uses_the_datasource_variable():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"

    def walk(panels):
        for panel in panels:
            assert panel["datasource"]["uid"] == "${datasource}", panel.get("title")
            walk(panel.get("panels", []))

    walk([p for p in dashboard["panels"] if p.get("type") != "row"])


def test_alert_exprs_use_registered_metrics():
    text = ALERTS.read_text()
    names = relay_names_in(text)
    assert "ray_relay_system_heartbeat_timestamp_seconds" in names
    assert names <= exported_names(), sorted(names - exported_names())


def test_readme_metrics_table_matches_registry():
    text = (DEPLOY / "README.md").read_text()
    start = text.index("-->", text.index("<!-- metrics table")) + len("-->")
    table = text[start:text.index("<!-- end metrics table -->")].strip()
    assert table == markdown_table(), "regenerate: python -c 'from core.metrics import markdown_table; ...'"
