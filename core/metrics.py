"""The single metrics registry: one name per quantity, in the JSONL log and in Prometheus.

A metric key is ``"<namespace>/<name>"`` with namespaces ``rollout/``, ``reward/``, ``learner/``,
``sync/``, ``eval/`` and ``system/``; units are part of the name (``_seconds``, ``_bytes``,
``_tokens``, ``_total`` for counters). The Prometheus name is ``relay_`` + key with ``/`` -> ``_``;
Ray's metrics agent prefixes ``ray_``, so ``learner/kl`` is scraped as ``ray_relay_learner_kl``.

Every series carries a ``component`` label (driver, learner, generation, reward). Per-actor series
add ``actor_id``; the learner's stage timings add ``phase``. The policy version is exported as a
gauge value (``sync/policy_version``), never as a label: a label that changes every step would
create a new series per step.

Tagged values in a flat dict (the JSONL log, or what an actor returns to the driver) are written
``key{tag=value}``, for example ``learner/step_seconds{phase=update}``; :func:`flat_key` builds such
a key and :meth:`MetricSink.log` accepts it.

Simplifications: non-finite values are written to JSONL as ``null`` and not sent to Prometheus; a
counter increment of 0 is dropped (Ray rejects it). Without ``ray.init`` a sink validates and
otherwise records nothing, so code using it runs in unit tests without Ray.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Kind = Literal["gauge", "counter", "histogram"]
COMPONENTS = ("driver", "learner", "generation", "reward")
NAMESPACES = ("rollout", "reward", "learner", "sync", "eval", "system", "offline")
PHASES = ("logprobs", "advantages", "update", "total")

# Bucket boundaries. Seconds span a reward call (ms) to a slow generation batch (minutes).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0)


@dataclass(frozen=True)
class MetricSpec:
    key: str
    """``namespace/name``, e.g. ``learner/kl``"""
    kind: Kind
    """gauge: set to the value; counter: incremented by the value; histogram: observes the value"""
    description: str
    """one line shown as the Prometheus HELP text and in the README table"""
    tag_keys: tuple[str, ...] = ()
    """labels besides ``component`` (always attached)"""
    boundaries: tuple[float, ...] | None = None
    """histogram bucket upper bounds (required for histograms, forbidden otherwise)"""

    @property
    def prometheus_name(self) -> str:
        """The name passed to ``ray.util.metrics`` (``relay_learner_kl``)."""
        return "relay_" + self.key.replace("/", "_")

    @property
    def exported_name(self) -> str:
        """The name a Prometheus scraping Ray's metrics port sees (``ray_relay_learner_kl``)."""
        return "ray_" + self.prometheus_name

    @property
    def all_tag_keys(self) -> tuple[str, ...]:
        return ("component", *self.tag_keys)


def _g(key: str, description: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(key, "gauge", description, tags)


def _c(key: str, description: str, tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(key, "counter", description, tags)


def _h(key: str, description: str, boundaries: tuple[float, ...], tags: tuple[str, ...] = ()) -> MetricSpec:
    return MetricSpec(key, "histogram", description, tags, boundaries)


_SPECS = [
    # rollout/: generation actors and the driver's sampling loop
    _c("rollout/generated_tokens_total", "response tokens sampled", ("actor_id",)),
    _h("rollout/generation_seconds", "wall time of one generate call", SECONDS_BUCKETS, ("actor_id",)),
    _h("rollout/prompt_length_tokens", "prompt length per rollout", TOKEN_BUCKETS),
    _h("rollout/response_length_tokens", "response length per rollout", TOKEN_BUCKETS),
    _g("rollout/response_length_mean_tokens", "mean response length of the step's rollouts"),
    _g("rollout/tokens_per_second", "response tokens sampled per second, all actors, this step"),
    _g("rollout/staleness_versions", "learner version minus the oldest policy_version trained on this step"),
    _g("rollout/token_staleness_mean", "mean versions each trained response token is behind the learner (streaming "
       "loop; with partial rollouts the versions mix within a response)"),
    _g("rollout/mixed_version_fraction", "share of the step's rollouts sampled by more than one policy version "
       "(generation.partial_rollouts)"),
    _g("rollout/queue_depth", "scored groups waiting in the rollout buffer for the learner (streaming loop)"),
    _g("rollout/wait_seconds", "time the step waited for the rollout buffer to hold a step's groups (streaming loop)"),
    _c("rollout/filtered_total", "groups the rollout buffer did not admit, by filter (uniform: all rewards equal)",
       ("reason",)),
    _c("rollout/samples_total", "rollouts produced"),
    _c("rollout/prompts_resampled_total", "prompts sampled again on another actor or after a restart, by why their "
       "first actor failed (died, stuck, error, wrong_version)", ("reason",)),
    _c("rollout/dropped_total", "rollouts sampled but not trained on, by reason (stale)", ("reason",)),
    # reward/: the reward service
    _h("reward/latency_seconds", "wall time of one reward batch", SECONDS_BUCKETS),
    _g("reward/mean", "mean reward of the step's train batch"),
    _g("reward/std", "standard deviation of the step's train rewards"),
    _g("reward/task_score", "mean held-out-score reward (train.eval_reward, else the training reward) of the "
       "step's train batch"),
    _c("reward/errors_total", "rollouts whose reward computation raised"),
    _c("reward/excluded_total", "rollouts excluded from the update (errors, zero-variance groups, too stale)"),
    _c("reward/truncated_total", "rollouts cut at the max response length"),
    _c("reward/code_runs_total", "sandboxed code runs of kind=code sources, by outcome (ok, failed, timeout, "
       "memory, cpu, crash, syntax, no_tests, output)", ("reason",)),
    _c("reward/function_timeouts_total", "calls of kind=function sources abandoned at their timeout_s"),
    # learner/: one PPO/GRPO step
    _g("learner/step_seconds", "wall time of a learner step stage", ("phase",)),
    _g("learner/policy_loss", "clipped policy loss"),
    _g("learner/value_loss", "value loss (0 without a critic)"),
    _g("learner/kl", "mean KL(policy || reference) per response token"),
    _g("learner/kl_coef", "current KL coefficient"),
    _g("learner/entropy", "mean policy entropy per response token"),
    _g("learner/clip_fraction", "fraction of tokens whose ratio was clipped"),
    _g("learner/approx_kl", "mean approximate KL(old || new) over the update"),
    _g("learner/grad_norm", "gradient norm before clipping"),
    _g("learner/padding_fraction", "share of the tokens in the learner's micro-batches that are padding"),
    _g("learner/explained_variance", "explained variance of the value head (0 without a critic)"),
    _g("learner/advantage_mean", "mean advantage over response tokens"),
    _g("learner/advantage_std", "standard deviation of advantages over response tokens"),
    _g("learner/return_mean", "mean return over response tokens"),
    _g("learner/lr", "learning rate"),
    _g("learner/kept_fraction", "fraction of rollouts kept for the update (uniform-reward groups dropped)"),
    _g("learner/tis_weight_mean", "mean importance weight pi_old/pi_sampler over the response tokens in the loss "
       "(algorithm.rollout_correction)"),
    _g("learner/logprob_gap_mean", "mean |log pi_old - log pi_sampler| over response tokens (learner vs vLLM)"),
    _g("learner/logprob_gap_max", "largest |log pi_old - log pi_sampler| of a response token (per micro-batch, "
       "averaged)"),
    _g("learner/corrected_fraction", "fraction of response tokens whose importance weight was truncated or masked"),
    _g("learner/truncated_masked_fraction", "fraction of samples cut at max_tokens and masked out of the loss "
       "(algorithm.mask_truncated)"),
    _g("rollout/extra_prompts", "prompts drawn beyond train.prompts_per_step this step (algorithm.dynamic_sampling)"),
    _g("learner/value_clip_fraction", "fraction of value predictions clipped (0 without a critic)"),
    _c("learner/tokens_trained_total", "response tokens the learner updated on"),
    _c("learner/steps_total", "learner steps completed"),
    _c("learner/bad_steps_total", "steps with a non-finite loss or gradient, skipped (learner.max_bad_steps)"),
    _g("learner/critic_warmup", "1 while the policy is held and only the critic learns (learner.critic_warmup_steps)"),
    # sync/: weight publication through the object store
    _g("sync/seconds", "publish plus slowest load of one weight sync (on-policy); streaming: the driver's time from "
       "the step's end to the version published and staged"),
    _g("sync/bytes", "bytes published per weight version"),
    _g("sync/policy_version", "policy version loaded by an actor", ("actor_id",)),
    _g("sync/publish_seconds", "learner time to pack and ray.put one weight version"),
    _g("sync/gather_seconds", "part of publish_seconds spent gathering sharded weights (fsdp) or merging LoRA"),
    _g("sync/load_seconds", "slowest actor's time to fetch and load one weight version"),
    _g("sync/swap_seconds", "generation time an actor lost installing weights fetched and prepared in the background "
       "(hidden sync, streaming loop), summed over the step's calls", ("actor_id",)),
    _g("sync/fetch_seconds", "slowest actor's ray.get of the published version (zero-copy from the object store); "
       "in the streaming loop's background fetch, with packing it for the CPU GEMMs"),
    # offline/: preference optimisation (relay dpo), per step; eval/*_heldout: the same on held-out pairs
    _g("offline/loss", "the step's loss: preference loss (relay dpo) or weighted negative log-likelihood (relay rwr)"),
    _g("offline/chosen_reward", "implicit reward beta * (log pi - log ref) of the chosen responses"),
    _g("offline/rejected_reward", "implicit reward of the rejected responses"),
    _g("offline/margin", "chosen minus rejected implicit reward"),
    _g("offline/accuracy", "share of pairs whose chosen implicit reward is above the rejected one's"),
    _g("offline/nll", "relay rwr: mean negative log-likelihood of the step's responses (unweighted)"),
    _g("offline/weight_max", "relay rwr: largest reward weight of the step (the weights have mean 1)"),
    _g("offline/grad_norm", "gradient norm before clipping"),
    _g("offline/lr", "learning rate"),
    _g("offline/step_seconds", "seconds of one preference step"),
    _g("eval/loss_heldout", "preference loss on held-out pairs"),
    _g("eval/chosen_reward_heldout", "implicit reward of the chosen responses of held-out pairs"),
    _g("eval/rejected_reward_heldout", "implicit reward of the rejected responses of held-out pairs"),
    _g("eval/margin_heldout", "implicit reward margin on held-out pairs"),
    _g("eval/accuracy_heldout", "preference accuracy on held-out pairs"),
    # eval/: held-out greedy evaluation
    _g("eval/task_score", "held-out score: mean eval reward (train.eval_reward, else the training reward) of "
       "greedy responses on the main eval set"),
    _g("eval/lag_steps", "streaming loop: steps trained while this held-out evaluation ran in the background; it is "
       "logged at the step it evaluated"),
    _g("eval/set_task_score", "held-out score of each named eval set", ("eval_set",)),
    _g("eval/pass_at_k", "share of held-out prompts with a sample (of train.eval_k) scoring >= eval_pass_threshold"),
    _g("eval/mean_at_k", "mean held-out score of train.eval_k samples per prompt"),
    _g("eval/set_pass_at_k", "pass@k of each named eval set", ("eval_set",)),
    _g("eval/reward_mean", "held-out mean reward-service score (the RM in relay pipeline) of greedy responses"),
    _g("eval/response_length_tokens", "held-out mean response length"),
    _g("eval/reference_reward_mean", "held-out mean reward-service score of the reference's greedy responses"),
    _g("eval/win_rate_vs_reference", "fraction of held-out prompts where the reward service prefers the policy's "
       "greedy response to the reference's (ties count half)"),
    _g("eval/kl_to_reference", "mean per-token k3 KL(policy || reference) over sampled held-out responses"),
    _g("eval/kl_k1_to_reference", "mean per-token k1 KL(policy || reference) over sampled held-out responses"),
    _g("eval/distinct_1", "distinct unigrams / unigrams over held-out greedy responses"),
    _g("eval/distinct_2", "distinct bigrams / bigrams over held-out greedy responses"),
    _g("eval/reward_hacking_flag", "1 when the monitor suspects reward hacking (any signal below)"),
    _g("eval/reward_hacking_signal", "1 when this signal of the hacking monitor fired: rm_vs_true (RM score up, "
       "held-out true score flat), kl_acceleration, length, repetition", ("signal",)),
    # system/
    _g("system/heartbeat_timestamp_seconds", "unix time of the component's last heartbeat"),
    _g("system/step_seconds", "wall time of one whole RL step (generate, score, update, sync)"),
    _c("system/actor_restarts_total", "actor restarts observed by the driver", ("actor_id",)),
    _c("system/actor_failures_total", "generation actor failures, by kind: died (crashed), error (a call raised, "
       "e.g. a dead engine; killed and restarted), stuck (missed its "
       "deadline and was killed), wrong_version (an on-policy shard came back from other weights than it was "
       "launched for, as after a failed load: redone, and the actor killed and restarted), retired (out of "
       "restarts, or its node is gone)", ("actor_id", "reason")),
    _g("system/fleet_size", "generation actors taking work"),
    _c("system/actors_added_total", "generation actors that joined a running job (generation.max_num_actors)"),
    _c("system/learner_restores_total", "times the learner was rebuilt from the last checkpoint after it died"),
    _g("system/checkpoint_seconds", "wall time of the last checkpoint (learner state, driver state, fsync, rename)"),
]


def _build_registry(specs: list[MetricSpec]) -> dict[str, MetricSpec]:
    registry: dict[str, MetricSpec] = {}
    for spec in specs:
        namespace, _, name = spec.key.partition("/")
        if namespace not in NAMESPACES or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"metric key {spec.key!r} must be '<namespace>/<snake_name>', namespace in {NAMESPACES}")
        if spec.key in registry:
            raise ValueError(f"metric key {spec.key!r} registered twice")
        if (spec.kind == "counter") != spec.key.endswith("_total"):
            raise ValueError(f"metric key {spec.key!r}: counters, and only counters, end in _total")
        if (spec.kind == "histogram") != (spec.boundaries is not None):
            raise ValueError(f"metric key {spec.key!r}: histograms, and only histograms, have boundaries")
        registry[spec.key] = spec
    return registry


METRICS: dict[str, MetricSpec] = _build_registry(_SPECS)
"""Every metric Relay emits, by key. The README table and the Grafana dashboard are checked against it."""

_FLAT_KEY = re.compile(r"^(?P<key>[^{}]+)(?:\{(?P<tags>[^{}]*)\})?$")


def flat_key(key: str, **tags: str) -> str:
    """``flat_key("learner/step_seconds", phase="update")`` -> ``"learner/step_seconds{phase=update}"``."""
    lookup(key)
    if not tags:
        return key
    return key + "{" + ",".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}"


def split_key(flat: str) -> tuple[str, dict[str, str]]:
    """Inverse of :func:`flat_key`: ``"a/b{x=1}"`` -> ``("a/b", {"x": "1"})``."""
    match = _FLAT_KEY.match(flat)
    if match is None:
        raise KeyError(f"malformed metric key {flat!r}; expected 'namespace/name' or 'namespace/name{{tag=value}}'")
    tags: dict[str, str] = {}
    for item in filter(None, (match["tags"] or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep:
            raise KeyError(f"malformed tag {item!r} in metric key {flat!r}; expected tag=value")
        tags[name.strip()] = value.strip()
    return match["key"], tags


def lookup(key: str) -> MetricSpec:
    """The spec for ``key``; an unknown key raises KeyError naming the closest registered keys."""
    try:
        return METRICS[key]
    except KeyError:
        close = difflib.get_close_matches(key, METRICS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; registered namespaces: {', '.join(NAMESPACES)}"
        raise KeyError(f"unknown metric key {key!r}{hint} (register new metrics in core/metrics.py)") from None


# One ray.util.metrics object per key per process: Ray metrics are process-global by name, so
# several sinks in one process (say the driver and an in-process reward) share them.
_RAY_METRICS: dict[str, Any] = {}


def _ray_metric(spec: MetricSpec) -> Any | None:
    """The Ray metric object for ``spec``, created on first use; None when Ray is not initialised."""
    import ray  # deferred: unit tests of code that logs metrics should not pay for importing Ray

    if not ray.is_initialized():
        return None
    metric = _RAY_METRICS.get(spec.key)
    if metric is None:
        from ray.util import metrics as ray_metrics

        if spec.kind == "gauge":
            metric = ray_metrics.Gauge(spec.prometheus_name, spec.description, spec.all_tag_keys)
        elif spec.kind == "counter":
            metric = ray_metrics.Counter(spec.prometheus_name, spec.description, spec.all_tag_keys)
        else:
            metric = ray_metrics.Histogram(
                spec.prometheus_name, spec.description, list(spec.boundaries or ()), spec.all_tag_keys
            )
        _RAY_METRICS[spec.key] = metric
    return metric


class MetricSink:
    """Records registered metrics to Prometheus through ``ray.util.metrics``.

    ``component`` is one of driver, learner, generation, reward and labels every series.
    ``default_tags`` (e.g. ``{"actor_id": "0"}``) apply to the metrics that declare those tags.
    """

    def __init__(self, component: str, default_tags: dict[str, str] | None = None):
        if component not in COMPONENTS:
            raise ValueError(f"component {component!r} is not one of {', '.join(COMPONENTS)}")
        self.component = component
        self.default_tags = _str_tags(default_tags)

    def log(self, values: Mapping[str, float], tags: dict[str, str] | None = None) -> None:
        """Gauges are set, counters incremented by the value, histograms observe the value.

        Keys may carry tags in flat form (``learner/step_seconds{phase=update}``). ``tags`` apply to
        the keys that declare them; a tag that none of the keys declares is an error.
        """
        tags = _str_tags(tags)
        declared: set[str] = set()
        for flat, value in values.items():
            spec, key_tags = self._resolve(flat)
            declared.update(spec.tag_keys)
            self._record(spec, [value], {**{k: v for k, v in tags.items() if k in spec.tag_keys}, **key_tags})
        if values and set(tags) - declared:
            unused = sorted(set(tags) - declared)
            raise ValueError(f"tags {unused} are declared by none of the metrics {sorted(values)}")

    def observe_many(self, key: str, values: Iterable[float], tags: dict[str, str] | None = None) -> None:
        """Observe every value into the histogram ``key`` (e.g. the response lengths of a batch)."""
        spec, key_tags = self._resolve(key)
        if spec.kind != "histogram":
            raise TypeError(f"observe_many needs a histogram; {spec.key!r} is a {spec.kind}")
        tags = _str_tags(tags)
        if set(tags) - set(spec.tag_keys):
            raise ValueError(f"metric {spec.key!r} declares tags {list(spec.tag_keys)}, got {sorted(tags)}")
        self._record(spec, values, {**tags, **key_tags})

    def heartbeat(self) -> None:
        """Set ``system/heartbeat_timestamp_seconds{component=...}`` to now; the stall alert watches it."""
        self.log({"system/heartbeat_timestamp_seconds": time.time()})

    @staticmethod
    def _resolve(flat: str) -> tuple[MetricSpec, dict[str, str]]:
        key, key_tags = split_key(flat)
        spec = lookup(key)
        if set(key_tags) - set(spec.tag_keys):
            raise ValueError(f"metric {key!r} declares tags {list(spec.tag_keys)}, got {flat!r}")
        return spec, key_tags

    def _final_tags(self, spec: MetricSpec, tags: dict[str, str]) -> dict[str, str]:
        if "component" in tags:
            raise ValueError("the 'component' tag is set by MetricSink(component=...), not per call")
        merged = {k: v for k, v in {**self.default_tags, **tags}.items() if k in spec.tag_keys}
        missing = [k for k in spec.tag_keys if k not in merged]
        if missing:
            raise ValueError(f"metric {spec.key!r} needs tag(s) {missing} (pass tags= or the sink's default_tags)")
        return {"component": self.component, **merged}

    def _record(self, spec: MetricSpec, values: Iterable[float], tags: dict[str, str]) -> None:
        final_tags = self._final_tags(spec, tags)
        metric = _ray_metric(spec)
        for raw in values:
            value = float(raw)
            if not math.isfinite(value):
                continue
            if spec.kind == "counter" and value < 0:
                raise ValueError(f"counter {spec.key!r} cannot decrease (got {value})")
            if metric is None:
                continue
            if spec.kind == "gauge":
                metric.set(value, tags=final_tags)
            elif spec.kind == "counter":
                if value > 0:
                    metric.inc(value, tags=final_tags)
            else:
                metric.observe(value, tags=final_tags)


def _str_tags(tags: Mapping[str, object] | None) -> dict[str, str]:
    return {k: str(v) for k, v in (tags or {}).items()}


def _jsonable(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class JsonlLogger:
    """Appends one JSON object per step, ``{"step": .., "time": .., **values}``, flushed per line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for flat in values:
            if flat in ("step", "time"):
                raise ValueError(f"{flat!r} is reserved in the JSONL log")
            lookup(split_key(flat)[0])
        record = {"step": int(step), "time": time.time(), **{k: _jsonable(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far: where a resumed run cuts the log back to."""
        return self._file.tell()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Every record of a JSONL log; a torn last line (the writer was killed mid-write) is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number} is not valid JSON") from None
    return records


def markdown_table() -> str:
    """The registry as the Markdown table in deploy/README.md (a test keeps the two equal)."""
    rows = ["| key | Prometheus (as scraped) | kind | labels | description |", "|---|---|---|---|---|"]
    for spec in METRICS.values():
        labels = ", ".join(f"`{tag}`" for tag in spec.all_tag_keys)
        rows.append(f"| `{spec.key}` | `{spec.exported_name}` | {spec.kind} | {labels} | {spec.description} |")
    return "\n".join(rows)
