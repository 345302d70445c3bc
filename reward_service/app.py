"""The reward service as one Ray Serve application.

An ingress deployment (``RewardIngress``) validates requests, fans them out to every source concurrently, and
combines the answers (``reward_service.combine``). Each source is a deployment of its own (``source-<name>``),
except a rule (``inline: true``, the default): a rule takes microseconds a sample, far less than the Serve hop to
a replica of its own, so the ingress scores it itself. Plain classes are made deployments only in ``build_app``.

A function source's ``.py`` file is read here, at deploy time, and its text travels to the replicas as a
deployment argument: Serve keeps deployment arguments in its controller's checkpoint, so every replica,
on any node and at any later time (a replacement after a node died), runs the file as it was deployed.
(A runtime_env ``py_modules`` copy was tried first: Ray takes only URIs there, so it needs a private
upload call, and the uploaded package is deleted from the cluster once no replica references it, so a
replacement replica on another node could not fetch it.)

Simplifications: running normalisation lives in the single ingress replica (more ingress replicas
would each keep their own statistics); a source call that raises (e.g. its replica died) fails
the whole call so that ``RewardClient`` retries it, while per-sample problems become error results.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from reward_service.combine import RunningNorm, combine, finish, validate_request
from reward_service.config import FunctionRef, RewardConfig, RewardSourceConfig
from reward_service.records import RewardRequest, RewardResult, SourceScore
from reward_service.scorers import CodeScorer, FunctionScorer, ModelScorer, RewardEnsemble, RuleScorer

INGRESS_MAX_ONGOING = 256
"""concurrent score calls the ingress accepts (callers beyond wait in Serve's queue)"""

HTTP_MAX_BODY_BYTES = 4 * 2**20
"""largest body (4 MiB) the debug HTTP route reads; a larger one gets 413 (a declared Content-Length over it before
the body is read). RL scores through the handle, which this does not limit"""

SCORERS = {"rule": RuleScorer, "model": ModelScorer, "ensemble": RewardEnsemble, "function": FunctionScorer,
            "code": CodeScorer}


class RewardIngress:
    """Validates, fans out to the sources, combines; also the debug HTTP route."""

    def __init__(self, cfg: RewardConfig, sources: dict[str, DeploymentHandle]):
        self._cfg = cfg
        self._sources = sources
        self._inline = {s.name: RuleScorer(s) for s in cfg.sources if s.in_ingress}
        self._specs = {s.name: s for s in cfg.sources}
        self._weights = {s.name: s.weight for s in cfg.sources}
        self._norm = RunningNorm() if cfg.normalize else None
        self._counts: Counter[str] = Counter()

    def config(self) -> RewardConfig:
        return self._cfg

    def norm_state(self) -> dict | None:
        """The running normalisation's statistics (``normalize: true``), for a checkpoint; None without."""
        return None if self._norm is None else dataclasses.asdict(self._norm)

    def set_norm_state(self, state: dict | None) -> None:
        """Continue the running normalisation from a checkpoint's ``norm_state``."""
        if self._norm is not None and state is not None:
            self._norm = RunningNorm(**state)

    def health(self) -> dict:
        """The ingress replica's pid and its source names (for debugging and the replica-death test)."""
        return {"pid": os.getpid(), "sources": [s.name for s in self._cfg.sources]}

    async def score(self, requests: list[Any]) -> list[RewardResult]:
        if not isinstance(requests, list):
            raise TypeError(f"score() takes a list of RewardRequest, got {type(requests).__name__}")
        self._counts["calls"] += 1
        self._counts["requests"] += len(requests)
        checked = [validate_request(r) for r in requests]
        valid = [r for r in checked if isinstance(r, RewardRequest)]
        per_source = await self._fan_out(valid)

        combined: list[tuple[float | None, dict[str, float], str | None]] = []
        j = 0
        for item in checked:
            if isinstance(item, str):
                self._counts["invalid"] += 1
                self._counts["errors"] += 1
                combined.append((None, {}, item))
                continue
            scores = {name: per_source[name][j] for name in per_source}
            j += 1
            reward, components, error, non_finite = combine(item, scores, self._weights)
            if non_finite:
                self._counts["excluded"] += 1
            elif error is not None:
                self._counts["errors"] += 1
            combined.append((reward, components, error))
        return finish(combined, self._norm, self._cfg.clip)

    async def _fan_out(self, requests: list[RewardRequest]) -> dict[str, list[SourceScore]]:
        """Every source's scores for ``requests``; model sources get chunks of max_batch_size so that
        several replicas share a large call."""
        if not requests:
            return {name: [] for name in self._specs}
        calls: dict[str, list] = {}
        for name, handle in self._sources.items():
            spec = self._specs[name]
            size = len(requests) if spec.kind == "rule" else spec.max_batch_size
            calls[name] = [handle.score.remote(requests[i:i + size]) for i in range(0, len(requests), size)]
        names = list(calls)
        pending = asyncio.gather(*(asyncio.gather(*calls[n]) for n in names))  # the deployments work meanwhile
        inline = {name: scorer.score_now(requests) for name, scorer in self._inline.items()}
        deployed = dict(zip(names, await pending, strict=True))
        return {n: inline[n] if n in inline else [s for chunk in deployed[n] for s in chunk] for n in self._specs}

    async def stats(self) -> dict[str, float]:
        """Ingress counters plus source counters summed over live replicas: model batching and truncation;
        with a function source ``function_timeouts``; with a code source ``code_<reason>`` for every
        ``sandbox.REASONS`` (why code runs ended)."""
        out = {k: float(self._counts[k]) for k in ("calls", "requests", "invalid", "errors", "excluded")}
        out.update(truncated=0.0, batches=0.0, batched_items=0.0, max_batch_size_seen=0.0)
        kinds = {spec.kind for spec in self._specs.values()}
        if "function" in kinds:
            out["function_timeouts"] = 0.0
        if "code" in kinds:
            from reward_service.sandbox import REASONS

            out.update({f"code_{reason}": 0.0 for reason in REASONS})
        for replicas in (await self.source_stats()).values():
            for st in replicas:
                out["truncated"] += st.get("truncated", 0)
                out["batches"] += st.get("batches", 0)
                out["batched_items"] += st.get("items", 0)
                out["max_batch_size_seen"] = max(out["max_batch_size_seen"], st.get("max_batch_size_seen", 0))
                if "function_timeouts" in out:
                    out["function_timeouts"] += st.get("timeouts", 0)
                for reason, n in st.get("code_reasons", {}).items():
                    out[f"code_{reason}"] = out.get(f"code_{reason}", 0.0) + n
        return out

    async def source_stats(self) -> dict[str, list[dict]]:
        """Per source, the stats() of each live replica (an inline rule's: the ingress's own scorer)."""
        names = list(self._sources)
        results = dict(zip(names, await asyncio.gather(*(_replica_stats(self._sources[n]) for n in names)),
                           strict=True))
        return {n: [self._inline[n].stats()] if n in self._inline else results[n] for n in self._specs}

    async def __call__(self, http_request) -> Any:
        """POST {"requests": [{"prompt", "response", "metadata"}]} -> {"results": [...]}. A call that is not a JSON
        POST of that shape gets a 4xx with {"error": what is wrong}; a bad sample gets an error result, as in
        ``score``."""
        from starlette.responses import JSONResponse

        try:
            body = await _json_body(http_request)
        except _HTTPError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
        results = await self.score(body["requests"])
        return JSONResponse({"results": [dataclasses.asdict(r) for r in results]})


_SHAPE = '{"requests": [{"prompt": ..., "response": ..., "metadata": {...}}, ...]}'


class _HTTPError(Exception):
    """A malformed call to the debug HTTP route: its status (4xx) and what is wrong."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


async def _json_body(http_request) -> dict:
    """The body of a POST of ``_SHAPE`` as JSON, read up to ``HTTP_MAX_BODY_BYTES``; else ``_HTTPError``."""
    if http_request.method != "POST":
        raise _HTTPError(405, f"use POST with a JSON body {_SHAPE}, not {http_request.method}", {"Allow": "POST"})
    ctype = http_request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise _HTTPError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}")
    too_large = _HTTPError(413, f"body larger than {HTTP_MAX_BODY_BYTES} bytes (HTTP_MAX_BODY_BYTES); send fewer "
                                "requests per call")
    declared = http_request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > HTTP_MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in http_request.stream():  # a chunked body declares no length: count as it comes
        size += len(chunk)
        if size > HTTP_MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or not UTF-8; RecursionError: nested too deep
        raise _HTTPError(400, f"body is not JSON ({str(exc)[:200] or type(exc).__name__}); expected {_SHAPE}") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, f"expected a JSON object {_SHAPE}, got {type(body).__name__}")
    unknown = sorted(set(body) - {"requests"})
    if unknown or "requests" not in body:
        what = f"unknown key(s) {unknown}" if unknown else "missing key 'requests'"
        raise _HTTPError(400, f"{what}; expected {_SHAPE}")
    if not isinstance(body["requests"], list):
        raise _HTTPError(400, f"'requests' must be a list, got {type(body['requests']).__name__}; expected {_SHAPE}")
    return body


async def _replica_stats(handle: DeploymentHandle) -> list[dict]:
    """stats() of every live replica; replicas that are down (e.g. restarting) are left out."""
    try:
        results = await handle.broadcast("stats").results_async(return_exceptions=True)
    except Exception:  # noqa: BLE001 - no replica available right now (DeploymentUnavailableError)
        return []
    return [r for r in results if isinstance(r, dict)]


def source_deployment_name(name: str) -> str:
    return f"source-{name}"


def _source_options(src: RewardSourceConfig, cfg: RewardConfig) -> dict:
    opts: dict[str, Any] = {
        "name": source_deployment_name(src.name),
        **_health_options(cfg),
        "ray_actor_options": {"num_cpus": src.num_cpus, "num_gpus": src.num_gpus},
        "max_ongoing_requests": src.max_ongoing_requests,
        **_logging_options(cfg),
    }
    if src.autoscaling is not None:
        opts["autoscaling_config"] = src.autoscaling.model_dump()
    else:
        opts["num_replicas"] = src.num_replicas or 1
    return opts


def _health_options(cfg: RewardConfig) -> dict[str, float]:
    return {"health_check_period_s": cfg.health_check_period_s, "health_check_timeout_s": cfg.health_check_timeout_s}


def serve_logging_config(cfg: RewardConfig) -> dict[str, bool]:
    """Serve's logging_config for the replicas and (``serve.start``) the proxy and controller. The access log is
    off by default: a line per call drowned the progress display, and on sources, called once per group, it costs
    replica CPU at high rates. Errors are logged either way."""
    return {"enable_access_log": cfg.access_log}


def _logging_options(cfg: RewardConfig) -> dict[str, dict[str, bool]]:
    return {"logging_config": serve_logging_config(cfg)}


def _bind_source(src: RewardSourceConfig, cfg: RewardConfig) -> serve.Application:
    deployment = serve.deployment(SCORERS[src.kind]).options(**_source_options(src, cfg))
    if src.kind == "function" and FunctionRef.parse(src.function).is_file:
        path = Path(FunctionRef.parse(src.function).target)
        try:
            text = path.read_text()
        except OSError as exc:
            raise FileNotFoundError(f"reward.sources[{src.name!r}].function: cannot read {path}: {exc}") from None
        return deployment.bind(src, text)
    return deployment.bind(src)


def build_app(cfg: RewardConfig) -> serve.Application:
    """The Serve application for ``cfg``: the ingress plus one deployment per source that is not an inline rule.
    Function files are read here (see the module docstring)."""
    sources = {src.name: _bind_source(src, cfg) for src in cfg.sources if not src.in_ingress}
    ingress = serve.deployment(RewardIngress).options(
        name="RewardIngress", num_replicas=1, max_ongoing_requests=INGRESS_MAX_ONGOING, **_health_options(cfg),
        ray_actor_options={"num_cpus": cfg.ingress_num_cpus}, **_logging_options(cfg))
    return ingress.bind(cfg, sources)
