"""Real Ray -> real Prometheus: every registered metric is scraped, every dashboard and alert query answers.

A local Ray exports metrics on a port we pick; a Ray actor logs every registered metric through
MetricSink (the real ``ray.util.metrics`` export path); a real ``prometheus`` binary scrapes that port
every second. The workload lives in the ``workload`` fixture alone so a short training run can
replace it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from cluster.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relay.json"

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install -y prometheus)"
)

WORKLOAD_STEPS = 12
STEP_PAUSE_S = 0.5
ACTOR_IDS = ("0", "1")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the Grafana dashboard."""
    found = []

    def walk(panels):
        for panel in panels:
            found.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except requests.RequestException as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def ray_metrics_port():
    """A local Ray whose metrics agent serves Prometheus text on a known port, exporting every second."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # left over from another module; we need our own metrics port
        ray.shutdown()
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False,
        # Workers import cluster.metrics and this module (the actor's helpers) by name.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}},
    )
    yield port
    ray.shutdown()


def expected_values(step: int) -> dict[str, float]:
    """What the workload logs at ``step`` (1-based) for each key; the sink adds the tags."""
    values = {}
    for key, spec in METRICS.items():
        if spec.kind == "gauge":
            values[key] = 0.01 * step if key != "system/heartbeat_timestamp_seconds" else 0.0
        elif spec.kind == "counter":
            values[key] = 2.0
        else:
            values[key] = 0.2 if key.endswith("_seconds") else 32.0
    return values


@pytest.fixture(scope="module")
def workload(ray_metrics_port):
    """Log every registered metric for a few seconds from a Ray actor, through MetricSink.

    Returns the (key, tags) -> value the last scrape must show. Replace with a short training
    run by returning the expectations that run guarantees.
    """
    import ray

    @ray.remote(num_cpus=0)
    class Workload:
        def run(self, steps: int, pause: float) -> None:
            from cluster.metrics import METRICS, MetricSink

            sinks = {name: MetricSink(name) for name in ("driver", "learner", "generation", "reward")}

            def emit(sink, key, value, tags=None):
                if METRICS[key].kind == "histogram":
                    sink.observe_many(key, [value] * 3, tags=tags)
                else:
                    sink.log({key: value}, tags=tags)

            for step in range(1, steps + 1):
                values = expected_values(step)
                for key, spec in METRICS.items():
                    if key == "system/heartbeat_timestamp_seconds":
                        continue
                    if "actor_id" in spec.tag_keys:
                        for actor_id in ACTOR_IDS:
                            emit(sinks["generation"], key, values[key], {"actor_id": actor_id})
                    elif "phase" in spec.tag_keys:
                        for phase in ("logprobs", "advantages", "update", "total"):
                            emit(sinks["learner"], key, values[key], {"phase": phase})
                    else:
                        emit(sinks["driver"], key, values[key])
                for sink in sinks.values():
                    sink.heartbeat()
                time.sleep(pause)

    actor = Workload.remote()
    started = time.time()
    ray.get(actor.run.remote(WORKLOAD_STEPS, STEP_PAUSE_S))
    return {"started": started, "steps": WORKLOAD_STEPS, "port": ray_metrics_port}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, workload):
    """A real Prometheus on loopback scraping Ray's metrics port every second, with our alert rules."""
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, work / "alerts.yml")
    (work / "prometheus.yml").write_text(json.dumps({  # JSON is valid YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{workload['port']}"]}]}],
    }))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/-/ready", timeout=1).ok, 30, "prometheus to be ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def query(url: str, expr: str) -> list[dict]:
    reply = requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert reply["status"] == "success", f"{expr!r}: {reply.get('error')}"
    return reply["data"]["result"]


def values_of(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


@pytest.fixture(scope="module")
def scraped(prometheus, workload):
    """Prometheus once it holds the final counter value and at least a few scrapes of it."""
    final = 2.0 * workload["steps"]
    wait_for(lambda: values_of(query(prometheus, "max(ray_relay_learner_steps_total)")) == [final], 40,
             f"ray_relay_learner_steps_total to reach {final}")
    time.sleep(3)  # a few more scrapes so rate() windows hold several points
    return prometheus


def test_every_registered_metric_is_scraped_with_its_labels(scraped, workload):
    last = expected_values(workload["steps"])
    for key, spec in METRICS.items():
        name = spec.exported_name + ("_count" if spec.kind == "histogram" else "")
        result = query(scraped, name)
        assert result, f"{key}: no series named {name}"
        for series in result:
            labels = series["metric"]
            assert labels["component"] in ("driver", "learner", "generation", "reward"), (key, labels)
            for tag in spec.tag_keys:
                assert tag in labels, f"{key}: series without its {tag!r} label: {labels}"
            assert "policy_version" not in labels
        values = values_of(result)
        if key == "system/heartbeat_timestamp_seconds":
            assert {s["metric"]["component"] for s in result} == {"driver", "learner", "generation", "reward"}
            assert all(workload["started"] - 5 < v < time.time() + 5 for v in values), values
        elif spec.kind == "gauge":
            assert values == pytest.approx([last[key]] * len(values)), key
        elif spec.kind == "counter":
            assert values == pytest.approx([2.0 * workload["steps"]] * len(values)), key
        else:
            assert values == pytest.approx([3.0 * workload["steps"]] * len(values)), key


def test_tagged_series_are_split_by_tag(scraped):
    actors = {s["metric"]["actor_id"] for s in query(scraped, "ray_relay_sync_policy_version")}
    assert actors == set(ACTOR_IDS)
    phases = {s["metric"]["phase"] for s in query(scraped, "ray_relay_learner_step_seconds")}
    assert phases == {"logprobs", "advantages", "update", "total"}


def test_histogram_buckets_are_cumulative(scraped, workload):
    result = query(scraped, "sum by (le) (ray_relay_reward_latency_seconds_bucket)")
    buckets = sorted((float(s["metric"]["le"]), float(s["value"][1])) for s in result)
    assert buckets[-1] == (math.inf, 3.0 * workload["steps"])
    below = [count for le, count in buckets if le < 0.2]
    assert below and max(below) == 0.0  # every observation was 0.2 s
    assert dict(buckets)[0.25] == 3.0 * workload["steps"]


@pytest.mark.parametrize("title,expr", dashboard_exprs())
def test_dashboard_query_returns_series(scraped, title, expr):
    promql = expr.replace("$__rate_interval", "1m")
    result = query(scraped, promql)
    assert result, f"panel {title!r}: {promql!r} returned no series"


def test_alert_rules_load_and_stay_quiet(scraped):
    rules = requests.get(f"{scraped}/api/v1/rules", timeout=5).json()["data"]["groups"]
    by_name = {rule["name"]: rule for group in rules for rule in group["rules"]}
    assert set(by_name) == {"RelayRunStalled", "RelaySyncDominates"}
    for rule in by_name.values():
        assert rule["health"] != "err", rule
    # Heartbeats are seconds old. The workload sets sync seconds equal to the step seconds, so the sync
    # rule's condition holds, but its 10-minute `for:` keeps it pending within this test.
    assert by_name["RelayRunStalled"]["state"] == "inactive"
    assert by_name["RelaySyncDominates"]["state"] in ("inactive", "pending")
    stalled = query(scraped, "time() - max by (component) (ray_relay_system_heartbeat_timestamp_seconds)")
    assert len(stalled) == 4 and all(0 <= v < 300 for v in values_of(stalled))
