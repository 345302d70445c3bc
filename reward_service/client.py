"""The driver's entry point to the reward service.

``RewardClient.deploy(cfg)`` starts Serve (HTTP on cfg.http_host:cfg.http_port), runs the app and waits
at most cfg.deploy_timeout_s for every replica to start; a replica that cannot start (a reward model that
does not load, a function that cannot be imported) fails the deploy with Serve's reason. ``score`` goes
through the ingress DeploymentHandle with a per-call timeout and retries the whole call when a replica
dies or the call times out (Serve replaces dead replicas meanwhile).
"""

from __future__ import annotations

import logging
import time

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, ApplicationStatusOverview, DeploymentStatus

from reward_service.app import build_app, serve_logging_config
from reward_service.config import RewardConfig
from reward_service.records import RewardRequest, RewardResult

logger = logging.getLogger(__name__)

RETRY_BACKOFF_S = 0.5
"""sleep before retry k is k * RETRY_BACKOFF_S"""
DEPLOY_POLL_S = 0.2
"""how often deploy() looks at the app's status"""


class RewardServiceError(RuntimeError):
    """A score call failed on every attempt."""


class RewardDeployError(RewardServiceError):
    """The reward app did not start: a replica failed to start, or deploy_timeout_s passed."""


class RewardClient:
    def __init__(self, handle: DeploymentHandle, cfg: RewardConfig, app_name: str):
        self._handle = handle
        self.cfg = cfg
        self.app_name = app_name
        self.retries = 0
        """score attempts repeated after a failure, by this client"""

    @classmethod
    def deploy(cls, cfg: RewardConfig, app_name: str = "relay-reward") -> RewardClient:
        """Start Serve (if needed) and run the reward app; ``ray.init()`` is the caller's job."""
        # Serve's own logging (controller, proxy) follows reward.access_log; it applies when this starts Serve
        logging_config = serve_logging_config(cfg)
        if cfg.http_enabled:
            serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port}, logging_config=logging_config)
            route_prefix: str | None = f"/{app_name}"
        else:
            serve.start(proxy_location="Disabled", logging_config=logging_config)
            route_prefix = None
        # run_many without waiting, then our own bounded wait: serve.run waits for RUNNING with no limit
        # (a replica that never gets its resources hangs it) and reports a failed replica without its reason.
        (handle,) = serve.run_many([serve.RunTarget(build_app(cfg), name=app_name, route_prefix=route_prefix)],
                                   wait_for_applications_running=False)
        _wait_until_running(app_name, cfg.deploy_timeout_s)
        logger.info("reward service %r running with sources %s", app_name, [s.name for s in cfg.sources])
        return cls(handle, cfg, app_name)

    @classmethod
    def connect(cls, app_name: str = "relay-reward") -> RewardClient:
        """Attach to an app that is already running (its config is read back from the ingress)."""
        handle = serve.get_app_handle(app_name)
        cfg = handle.config.remote().result(timeout_s=30)
        return cls(handle, cfg, app_name)

    @property
    def url(self) -> str:
        """The debug HTTP route (POST JSON there)."""
        return f"http://{self.cfg.http_host}:{self.cfg.http_port}/{self.app_name}"

    def score(self, requests: list[RewardRequest]) -> list[RewardResult]:
        """One RewardResult per request, in order. Raises RewardServiceError after max_retries retries."""
        if not isinstance(requests, list):  # a caller bug: fail now rather than retry it
            raise TypeError(f"score() takes a list of RewardRequest, got {type(requests).__name__}")
        last: Exception | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(RETRY_BACKOFF_S * attempt)
            try:
                return self._handle.score.remote(requests).result(timeout_s=self.cfg.timeout_s)
            except (ray.exceptions.RayError, TimeoutError) as exc:  # replica death, actor errors, timeouts
                last = exc
                logger.warning("reward call failed (attempt %d/%d): %s", attempt + 1,
                               self.cfg.max_retries + 1, _first_line(exc))
        raise RewardServiceError(
            f"reward service {self.app_name!r}: score of {len(requests)} requests failed "
            f"{self.cfg.max_retries + 1} times (timeout_s={self.cfg.timeout_s}); last error: {_first_line(last)}"
        ) from last

    def stats(self) -> dict[str, float]:
        """Counters: calls, requests, invalid, errors, excluded (NaN/inf), truncated, batches,
        batched_items, max_batch_size_seen (model counters are summed over live replicas), and this
        client's retries."""
        return {**self._handle.stats.remote().result(timeout_s=self.cfg.timeout_s), "retries": float(self.retries)}

    def source_stats(self) -> dict[str, list[dict]]:
        """Per source, each live replica's own stats (batch sizes seen, truncation, ...)."""
        return self._handle.source_stats.remote().result(timeout_s=self.cfg.timeout_s)

    def norm_state(self) -> dict | None:
        """The running reward normalisation's statistics (``normalize: true``), else None."""
        return self._handle.norm_state.remote().result(timeout_s=self.cfg.timeout_s)

    def set_norm_state(self, state: dict | None) -> None:
        self._handle.set_norm_state.remote(state).result(timeout_s=self.cfg.timeout_s)

    def health(self) -> dict:
        """The ingress replica's pid and source names."""
        return self._handle.health.remote().result(timeout_s=self.cfg.timeout_s)

    def shutdown(self, stop_serve: bool = True) -> None:
        """Delete this app; stop Serve too if no other application is left (``stop_serve``). A caller about to
        stop its own local Ray passes False: Serve goes with it, and stopping it first kills its controller under
        the long-poll calls still waiting on it, whose failures Ray prints on the console."""
        serve.delete(self.app_name)
        if stop_serve and not serve.status().applications:
            serve.shutdown()


def _wait_until_running(app_name: str, timeout_s: float) -> None:
    """Return once the app is RUNNING; else start deleting it and raise RewardDeployError with each unhealthy
    deployment's message (Serve's, with the replica's exception)."""
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        failed = app is not None and app.status == ApplicationStatus.DEPLOY_FAILED
        if failed or time.monotonic() > deadline:
            break
        time.sleep(DEPLOY_POLL_S)
    what = "failed" if failed else f"did not start within deploy_timeout_s={timeout_s:g}s"
    problems = _unhealthy(app) if app is not None else "the app was never created"
    # not blocking: deleting a replica that is still waiting for resources takes Serve about 20 s
    serve.delete(app_name, _blocking=False)
    raise RewardDeployError(f"reward service {app_name!r} {what}: {problems}")


def _unhealthy(app: ApplicationStatusOverview) -> str:
    """One line per unhealthy deployment with the last line of its message (the replica's exception, e.g.
    the ImportError of a reward function), then the full messages (tracebacks)."""
    bad = {name: dep.message.strip() or f"no replica is running yet; replicas: {dict(dep.replica_states)}"
           for name, dep in app.deployments.items() if dep.status != DeploymentStatus.HEALTHY}
    if not bad:
        return app.message
    headlines = "; ".join(f"{name}: {message.splitlines()[-1]}" for name, message in bad.items())
    details = [f"{name}: {message}" for name, message in bad.items() if "\n" in message]
    return "\n\n".join([headlines, *details])


def _first_line(exc: BaseException | None) -> str:
    text = str(exc) if exc is not None else "none"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
