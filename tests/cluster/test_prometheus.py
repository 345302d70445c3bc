"""Real Ray -> real Prometheus: a real training run's metrics, every registered metric, every dashboard query.

A local Ray exports metrics every second on a port we pick, and a real ``prometheus`` binary scrapes it
every second from before anything runs. Two workloads run one after the other in that Ray:

1. ``training_run``: ``cluster.train.train`` in this process, tiny (6 PPO steps, 2 generation actors).
   Its driver joins our Ray (``init_ray`` returns early when Ray is initialised). Instant queries about
   it are evaluated at the moment ``train`` returned: series of actors that have exited go stale in
   Prometheus soon after (Ray stops exporting a dead worker's gauges), so "now" would be too late.
2. ``workload``: a Ray actor logging every registered metric through MetricSink with known values. The
   exact-value tests select its series by ``WorkerId``, so the training run's series do not mix in.
   Dashboard queries that a healthy short run cannot answer (no actor restarts, no reward errors, ...)
   are checked against it only; ``SYNTHETIC_ONLY`` names them and why.
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

from core.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "relay.json"
CACHE = REPO / ".relay_cache"  # the SFT-30 policy is built once and cached here

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install -y prometheus)"
)

WORKLOAD_STEPS = 12
STEP_PAUSE_S = 0.5
ACTOR_IDS = ("0", "1")
TRAIN_STEPS = 6
# PPO so the critic's series (value loss, explained variance) are real, with the KL in the reward so the
# reference's are; PPO updates on every batch, so the 0%-accuracy SFT-30 start still trains. The format
# rule makes rewards vary within a group.
TRAIN_CONFIG = {
    "sft": {"steps": 30},
    "model": {"cache_dir": str(CACHE)},
    "generation": {"num_actors": len(ACTOR_IDS), "torch_threads": 1},  # two engines share 2 cores
    "reward": {"http_enabled": False, "sources": [  # no Serve proxy: port 8000 may be taken on a shared machine
        {"name": "exact_match", "kind": "rule", "rule": "exact_match", "weight": 1.0},
        {"name": "format", "kind": "rule", "rule": "format", "weight": 0.2}]},
    "algorithm": {"name": "ppo", "kl_in": "reward"},
    "train": {"steps": TRAIN_STEPS, "eval_every": 2, "eval_prompts": 50, "prompts_per_step": 16, "time_limit_s": None},
    "metrics": {"progress": False},
}
# Dashboard queries a healthy 6-step run leaves empty, checked against the synthetic workload instead.
SYNTHETIC_ONLY = {
    "sum by (actor_id) (ray_relay_system_actor_restarts_total)": "no actor restarts (the counter starts at the first)",
    "sum(rate(ray_relay_reward_errors_total[$__rate_interval]))": "no reward errors (Ray drops 0 increments)",
    "sum(rate(ray_relay_reward_excluded_total[$__rate_interval]))": "PPO keeps every rollout, none errs",
    "max(ray_relay_rollout_queue_depth)": "on-policy: nothing queues (the streaming loop's buffer exports it)",
}


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
        num_cpus=6,  # learner + 2 generation actors + reward replicas, logical (they alternate on 2 cores)
        include_dashboard=False,
        _metrics_export_port=port,
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False,
        # Workers import the repo's packages and this module (the workload actor's helpers) by name.
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}},
    )
    yield port
    ray.shutdown()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, ray_metrics_port):
    """A real Prometheus on loopback scraping Ray's metrics port every second, with our alert rules."""
    work = tmp_path_factory.mktemp("prometheus")
    shutil.copy(ALERTS, work / "alerts.yml")
    (work / "prometheus.yml").write_text(json.dumps({  # JSON is valid YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": [f"127.0.0.1:{ray_metrics_port}"]}]}],
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


def query(url: str, expr: str, at: float | None = None) -> list[dict]:
    """An instant query, evaluated now or at unix time ``at``."""
    params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
    reply = requests.get(f"{url}/api/v1/query", params=params, timeout=5).json()
    assert reply["status"] == "success", f"{expr!r}: {reply.get('error')}"
    return reply["data"]["result"]


def values_of(result: list[dict]) -> list[float]:
    return [float(series["value"][1]) for series in result]


# ---- the real training run ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def training_run(prometheus, ray_metrics_port, tmp_path_factory):
    """``train(cfg)`` in this process; returns the summary, the JSONL rows and the end time to query at."""
    import yaml

    from cluster.config import load_config
    from cluster.train import train

    run_dir = tmp_path_factory.mktemp("run")
    config = run_dir / "relay.yaml"
    config.write_text(yaml.safe_dump({**TRAIN_CONFIG, "train": {**TRAIN_CONFIG["train"], "run_dir": str(run_dir)}}))
    cfg = load_config(str(config), [])
    started = time.time()
    summary = train(cfg)
    ended = time.time()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at = ended - 0.5
    # The last export (1 s) and scrape (1 s) before `at` are in once Prometheus has scraped past it.
    wait_for(lambda: values_of(query(prometheus, "max(ray_relay_learner_steps_total)", at)) == [TRAIN_STEPS], 20,
             f"ray_relay_learner_steps_total to reach {TRAIN_STEPS} at the end of the run")
    print(f"\ntraining run: {ended - started:.1f} s in train(), {summary['rl_seconds']} s of RL")
    return {"summary": summary, "rows": rows, "started": started, "at": at, "run_dir": run_dir}


def test_real_run_counts_tokens_per_actor(prometheus, training_run):
    at = training_run["at"]
    result = query(prometheus, "ray_relay_rollout_generated_tokens_total", at)
    per_actor = {s["metric"]["actor_id"]: float(s["value"][1]) for s in result}
    assert set(per_actor) == set(ACTOR_IDS), result
    assert all(v > 0 for v in per_actor.values()), per_actor
    # The driver's JSONL sums the same tokens per step; the actors also count their greedy evaluations.
    logged = sum(r.get("rollout/generated_tokens_total", 0.0) for r in training_run["rows"])
    assert sum(per_actor.values()) >= logged > 0
    samples = values_of(query(prometheus, "sum(ray_relay_rollout_samples_total)", at))
    assert samples == [sum(r.get("rollout/samples_total", 0.0) for r in training_run["rows"])]
    versions = query(prometheus, "ray_relay_sync_policy_version", at)
    assert {s["metric"]["actor_id"]: float(s["value"][1]) for s in versions} == dict.fromkeys(ACTOR_IDS, TRAIN_STEPS)


def test_real_run_learner_phases_and_losses(prometheus, training_run):
    at = training_run["at"]
    result = query(prometheus, "ray_relay_learner_step_seconds", at)
    phases = {s["metric"]["phase"]: float(s["value"][1]) for s in result}
    assert set(phases) == {"logprobs", "advantages", "update", "total"}, phases
    assert 0 < phases["total"] < 600 and phases["total"] >= phases["update"] > 0, phases
    last = training_run["rows"][-1]
    for key in ("learner/policy_loss", "learner/value_loss", "learner/kl", "learner/entropy", "learner/lr"):
        name = METRICS[key].exported_name
        got = values_of(query(prometheus, name, at))
        assert len(got) == 1 and math.isfinite(got[0]), (name, got)
        if key in last:
            assert got[0] == pytest.approx(last[key], rel=1e-6), (name, got, last[key])
    assert values_of(query(prometheus, "ray_relay_learner_entropy", at))[0] > 0
    trained = values_of(query(prometheus, "ray_relay_learner_tokens_trained_total", at))
    assert trained and trained[0] > 0


def test_real_run_sync_bytes_match_the_model(prometheus, training_run):
    at = training_run["at"]
    (synced,) = values_of(query(prometheus, "max(ray_relay_sync_bytes)", at))
    weights = sum(f.stat().st_size for f in (training_run["run_dir"] / "checkpoints" / "final").glob("*.safetensors"))
    # fp32 parameters either way; the safetensors header and index add a little on each side
    assert synced == pytest.approx(weights, rel=0.05), (synced, weights)
    share = 'max(ray_relay_sync_seconds) / max(ray_relay_learner_step_seconds{phase="total"})'
    (ratio,) = values_of(query(prometheus, share, at))
    assert 0 < ratio < 1000


def test_real_run_heartbeats_and_eval(prometheus, training_run):
    at, started = training_run["at"], training_run["started"]
    beats = {s["metric"]["component"]: float(s["value"][1])
             for s in query(prometheus, "max by (component) (ray_relay_system_heartbeat_timestamp_seconds)", at)}
    assert {"driver", "learner", "generation"} <= set(beats), beats
    assert all(started < v <= at + 1 for v in beats.values()), (started, at, beats)
    (score,) = values_of(query(prometheus, "max(ray_relay_eval_task_score)", at))
    assert 0.0 <= score <= 1.0
    assert score == pytest.approx(training_run["summary"]["eval_final"])
    (reward,) = values_of(query(prometheus, "avg(ray_relay_reward_mean)", at))
    assert 0.0 <= reward <= 1.2  # exact match (1.0) + format (0.2)


@pytest.mark.parametrize("title,expr", dashboard_exprs())
def test_dashboard_query_answers_for_the_real_run(prometheus, training_run, title, expr):
    promql = expr.replace("$__rate_interval", "1m")
    result = query(prometheus, promql, training_run["at"])
    if expr in SYNTHETIC_ONLY:
        assert not result, f"{promql!r} has series from a real run now: remove it from SYNTHETIC_ONLY"
        pytest.skip(f"checked against the synthetic workload: {SYNTHETIC_ONLY[expr]}")
    assert result, f"panel {title!r}: {promql!r} returned no series for the training run"


# ---- the synthetic workload: every registered metric with known values ----------------------------------------


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
def workload(ray_metrics_port, training_run):
    """Log every registered metric for a few seconds from a Ray actor, through MetricSink.

    Runs after the training run (whose instant queries are evaluated at its own end time). Returns the
    actor's ``WorkerId`` label, which selects this workload's series alone.
    """
    import ray

    @ray.remote(num_cpus=0)
    class Workload:
        def run(self, steps: int, pause: float) -> str:
            from core.metrics import METRICS, MetricSink

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
                        extra = {"reason": "died"} if "reason" in spec.tag_keys else {}
                        for actor_id in ACTOR_IDS:
                            emit(sinks["generation"], key, values[key], {"actor_id": actor_id, **extra})
                    elif "phase" in spec.tag_keys:
                        for phase in ("logprobs", "advantages", "update", "total"):
                            emit(sinks["learner"], key, values[key], {"phase": phase})
                    elif "reason" in spec.tag_keys:
                        emit(sinks["driver"], key, values[key], {"reason": "timeout"})
                    elif "eval_set" in spec.tag_keys:
                        emit(sinks["driver"], key, values[key], {"eval_set": "heldout"})
                    elif "signal" in spec.tag_keys:
                        emit(sinks["driver"], key, values[key], {"signal": "rm_vs_true"})
                    else:
                        emit(sinks["driver"], key, values[key])
                for sink in sinks.values():
                    sink.heartbeat()
                time.sleep(pause)
            return ray.get_runtime_context().get_worker_id()

    actor = Workload.remote()
    started = time.time()
    worker_id = ray.get(actor.run.remote(WORKLOAD_STEPS, STEP_PAUSE_S))
    return {"started": started, "steps": WORKLOAD_STEPS, "port": ray_metrics_port,
            "only": f'{{WorkerId="{worker_id}"}}'}



@pytest.fixture(scope="module")
def scraped(prometheus, workload):
    """Prometheus once it holds the final counter value and at least a few scrapes of it."""
    final = 2.0 * workload["steps"]
    only = workload["only"]
    wait_for(lambda: values_of(query(prometheus, f"max(ray_relay_learner_steps_total{only})")) == [final], 40,
             f"ray_relay_learner_steps_total to reach {final}")
    time.sleep(3)  # a few more scrapes so rate() windows hold several points
    return prometheus


def test_every_registered_metric_is_scraped_with_its_labels(scraped, workload):
    last = expected_values(workload["steps"])
    for key, spec in METRICS.items():
        name = spec.exported_name + ("_count" if spec.kind == "histogram" else "")
        result = query(scraped, name + workload["only"])
        assert result, f"{key}: no series named {name} from the workload"
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


def test_tagged_series_are_split_by_tag(scraped, workload):
    only = workload["only"]
    actors = {s["metric"]["actor_id"] for s in query(scraped, f"ray_relay_sync_policy_version{only}")}
    assert actors == set(ACTOR_IDS)
    phases = {s["metric"]["phase"] for s in query(scraped, f"ray_relay_learner_step_seconds{only}")}
    assert phases == {"logprobs", "advantages", "update", "total"}


def test_histogram_buckets_are_cumulative(scraped, workload):
    result = query(scraped, f"sum by (le) (ray_relay_reward_latency_seconds_bucket{workload['only']})")
    buckets = sorted((float(s["metric"]["le"]), float(s["value"][1])) for s in result)
    assert buckets[-1] == (math.inf, 3.0 * workload["steps"])
    below = [count for le, count in buckets if le < 0.2]
    assert below and max(below) == 0.0  # every observation was 0.2 s
    assert dict(buckets)[0.25] == 3.0 * workload["steps"]


def test_synthetic_only_queries_are_on_the_dashboard():
    assert set(SYNTHETIC_ONLY) <= {expr for _, expr in dashboard_exprs()}, "SYNTHETIC_ONLY names a removed query"


@pytest.mark.parametrize("title,expr", [(t, e) for t, e in dashboard_exprs() if e in SYNTHETIC_ONLY])
def test_dashboard_query_answers_for_the_workload(scraped, title, expr):
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
    # the training run's heartbeats (minutes old at most) and the workload's both count here
    assert len(stalled) == 4 and all(0 <= v < 300 for v in values_of(stalled))
