"""Writes ``deploy/grafana/dashboards/relay.json`` from the panel list below.

Edit the panels here and rerun ``python deploy/grafana/build_dashboard.py``; the JSON is committed so
Grafana provisioning needs no Python. ``tests/cluster/test_metrics.py`` checks every expression
against ``core.metrics.METRICS`` and ``tests/cluster/test_prometheus.py`` runs them against a real
Prometheus scraping a real Ray.

Gauges are aggregated (``max``/``avg``) so the per-worker labels Ray adds (``WorkerId``,
``NodeAddress``, ``SessionName``) and a restarted actor's second worker collapse into one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "relay.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


@dataclass
class Panel:
    title: str
    targets: list[tuple[str, str]]
    """(PromQL expr, legend)"""
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    description: str = ""
    extra: dict = field(default_factory=dict)


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    group = f"le, {by}" if by else "le"
    label = f"{{{{{by}}}}} " if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", f"{label}p{round(q * 100)}")
            for q in qs]


ROWS: list[tuple[str, list[Panel]]] = [
    ("Overview", [
        Panel("Held-out task score", [("max(ray_relay_eval_task_score)", "eval")], "percentunit", "stat", 6),
        Panel("Learner steps", [("max(ray_relay_learner_steps_total)", "steps")], "short", "stat", 6),
        Panel("Policy version (newest actor)", [("max(ray_relay_sync_policy_version)", "version")], "short", "stat", 6),
        Panel("Actor restarts", [("sum(ray_relay_system_actor_restarts_total) or vector(0)", "restarts")],
              "short", "stat", 6),
    ]),
    ("Rollouts", [
        Panel("Throughput", [
            ("sum(ray_relay_rollout_tokens_per_second)", "tokens/s (step)"),
            (f"sum(rate(ray_relay_rollout_generated_tokens_total[{RATE}]))", "tokens/s (counter)"),
            (f"sum(rate(ray_relay_rollout_samples_total[{RATE}]))", "samples/s"),
        ], "short"),
        Panel("Tokens/s per actor", [
            (f"sum by (actor_id) (rate(ray_relay_rollout_generated_tokens_total[{RATE}]))", "actor {{actor_id}}"),
        ], "short"),
        Panel("Generation call seconds per actor", quantiles("ray_relay_rollout_generation_seconds", "actor_id",
                                                             (0.5, 0.95)), "s"),
        Panel("Response length (tokens)", [
            *quantiles("ray_relay_rollout_response_length_tokens", qs=(0.5, 0.95)),
            ("max(ray_relay_rollout_response_length_mean_tokens)", "mean"),
            ("max(ray_relay_eval_response_length_tokens)", "eval mean"),
        ], "short"),
        Panel("Prompt length (tokens)", quantiles("ray_relay_rollout_prompt_length_tokens", qs=(0.5, 0.95)), "short"),
        Panel("Policy version per actor and staleness", [
            ("max by (actor_id) (ray_relay_sync_policy_version)", "actor {{actor_id}} version"),
            ("max(ray_relay_rollout_staleness_versions)", "staleness (versions)"),
            ("max(ray_relay_rollout_queue_depth)", "queue depth"),
        ], "short"),
    ]),
    ("Rewards", [
        Panel("Reward and task score", [
            ("avg(ray_relay_reward_mean)", "train reward mean"),
            ("avg(ray_relay_reward_std)", "train reward std"),
            ("avg(ray_relay_reward_task_score)", "train task score"),
            ("avg(ray_relay_eval_task_score)", "eval task score"),
            ("avg(ray_relay_eval_reward_mean)", "eval reward mean"),
        ], "short"),
        Panel("Reward latency", quantiles("ray_relay_reward_latency_seconds"), "s"),
        Panel("Excluded, errors, truncated", [
            (f"sum(rate(ray_relay_reward_excluded_total[{RATE}]))", "excluded/s"),
            (f"sum(rate(ray_relay_reward_errors_total[{RATE}]))", "errors/s"),
            (f"sum(rate(ray_relay_reward_truncated_total[{RATE}]))", "truncated/s"),
        ], "short"),
    ]),
    ("Learner", [
        Panel("KL and KL coefficient", [
            ("avg(ray_relay_learner_kl)", "KL(policy||ref)"),
            ("avg(ray_relay_learner_approx_kl)", "approx KL(old||new)"),
            ("avg(ray_relay_learner_kl_coef)", "KL coef"),
        ], "short"),
        Panel("Losses", [
            ("avg(ray_relay_learner_policy_loss)", "policy"),
            ("avg(ray_relay_learner_value_loss)", "value"),
        ], "short"),
        Panel("Entropy, clip fraction, grad norm", [
            ("avg(ray_relay_learner_entropy)", "entropy"),
            ("avg(ray_relay_learner_clip_fraction)", "clip fraction"),
            ("avg(ray_relay_learner_grad_norm)", "grad norm"),
        ], "short"),
        Panel("Advantages and returns", [
            ("avg(ray_relay_learner_advantage_mean)", "advantage mean"),
            ("avg(ray_relay_learner_advantage_std)", "advantage std"),
            ("avg(ray_relay_learner_return_mean)", "return mean"),
            ("avg(ray_relay_learner_explained_variance)", "explained variance"),
        ], "short"),
        Panel("Learner step seconds by phase", [
            ("max by (phase) (ray_relay_learner_step_seconds)", "{{phase}}"),
        ], "s"),
        Panel("Learning rate and trained tokens", [
            ("avg(ray_relay_learner_lr)", "lr"),
            (f"sum(rate(ray_relay_learner_tokens_trained_total[{RATE}]))", "trained tokens/s"),
        ], "short"),
    ]),
    ("Weight sync", [
        Panel("Weight sync seconds", [
            ("max(ray_relay_sync_seconds)", "total"),
            ("max(ray_relay_sync_publish_seconds)", "publish"),
            ("max(ray_relay_sync_load_seconds)", "load (slowest actor)"),
            ("max(ray_relay_sync_seconds) / max(ray_relay_learner_step_seconds{phase=\"total\"})",
             "share of learner step"),
        ], "s"),
        Panel("Weight sync bytes", [("max(ray_relay_sync_bytes)", "bytes per version")], "bytes"),
    ]),
    ("System", [
        Panel("Heartbeat age per component", [
            ("time() - max by (component) (ray_relay_system_heartbeat_timestamp_seconds)", "{{component}}"),
        ], "s", description="Seconds since each component's last heartbeat; RelayRunStalled fires above 300."),
        Panel("Actor restarts", [
            ("sum by (actor_id) (ray_relay_system_actor_restarts_total)", "actor {{actor_id}}"),
        ], "short"),
    ]),
]


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    height = 4 if panel.kind == "stat" else 8
    body = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "none"}},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
             "range": True}
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }
    if panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "value", "graphMode": "area"}
    body.update(panel.extra)
    return body


def dashboard() -> dict:
    panels, panel_id, y = [], 1, 0
    for row_title, row_panels in ROWS:
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        panel_id, y, x, row_height = panel_id + 1, y + 1, 0, 0
        for panel in row_panels:
            if x + panel.width > 24:
                x, y, row_height = 0, y + row_height, 0
            body = panel_json(panel, panel_id, x, y)
            panels.append(body)
            panel_id, x, row_height = panel_id + 1, x + panel.width, max(row_height, body["gridPos"]["h"])
        y += row_height
    return {
        "uid": "relay-rlhf",
        "title": "Relay RLHF",
        "description": "Relay training run: rollouts, rewards, learner, weight sync, heartbeats (core/metrics.py).",
        "tags": ["relay", "ray", "rlhf"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
        }]},
        "panels": panels,
    }


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {OUT}")
