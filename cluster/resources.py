"""Starting or joining Ray, and failing fast when the cluster cannot hold the configured actors."""

from __future__ import annotations

import math
import os
from pathlib import Path

import ray

from cluster.config import RelayConfig


class ResourceError(RuntimeError):
    """The configuration asks for more than the cluster has."""


def init_ray(cfg: RelayConfig, log=print, log_to_driver: bool = False, link_logs: Path | None = None) -> bool:
    """Join ``cluster.address`` (or the job's cluster under ``ray job submit``), else start a local Ray sized by
    ``local_cpus``.

    The actors' and reward replicas' stdout/stderr go to files in the Ray session's log directory (named once
    through ``log``; for a local Ray also linked as ``<link_logs>/logs``, the run directory's), and also to this
    console with ``log_to_driver`` (``metrics.log_to_driver``): vLLM's and Serve's lines would otherwise
    interleave with the progress line. A local Ray's daemons and workers inherit this process's CPU mask
    (``core_layout``).
    Returns whether this call connected (so the caller disconnects); False if Ray was already up.
    """
    if ray.is_initialized():
        return False
    address = ray_address(cfg)
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
        log(f"joined Ray cluster at {address}")
    else:
        num_cpus = cfg.cluster.local_num_cpus or local_cpus(cfg)
        port = cfg.cluster.metrics_export_port
        kwargs = {"_metrics_export_port": port} if port else {}
        # address="local": always a new Ray here, never one another process left in /tmp/ray/ray_current_cluster
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver,
                           **kwargs)
        log(f"started a local Ray with {num_cpus} logical CPUs")
    session_dir = getattr(context, "address_info", {}).get("session_dir")  # a ray:// client's context has none
    linked = _link_logs(link_logs, session_dir) if link_logs is not None and session_dir and not address else None
    log(component_logs_line(session_dir, joined=bool(address), shown=log_to_driver, linked=linked))
    if not log_to_driver:
        quiet_libraries()
    return True


def ray_address(cfg: RelayConfig) -> str | None:
    """The cluster a run joins (``cluster.address``, else ``RAY_ADDRESS``); None: it starts a local Ray."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS")


def core_layout(cfg: RelayConfig, cores: list[int]) -> dict[str, list] | None:
    """Disjoint cores for a local CPU run that generates and learns at once (``max_staleness`` >= 1): each
    generation actor's ``engine_threads`` get cores of their own (``actors``, one list per actor), and the
    learner, the driver, the reward replicas and Ray's daemons share the ``rest``. Measured on 2 cores, streaming
    1 + 1: 0.363 s a step pinned against 0.404 unpinned, since the driver, Serve and Ray's daemons no longer
    preempt generation, the loop's bound. None where nothing overlaps (on-policy steps alternate and want every
    core for each side), where the threads do not fit (``oversubscription_warning``), on GPUs or on a cluster
    Relay did not start."""
    threads = _overlapping_threads(cfg)
    if not cfg.cluster.pin_cores or threads is None:
        return None
    engines, learner = threads
    if engines + cfg.learner.num_workers * learner > len(cores):
        return None
    rest, mine = cores[:len(cores) - engines], cores[len(cores) - engines:]
    t = cfg.generation.engine_threads
    return {"rest": rest, "actors": [mine[i * t:(i + 1) * t] for i in range(cfg.generation.num_actors)]}


def _overlapping_threads(cfg: RelayConfig) -> tuple[int, int] | None:
    """(all generation actors' engine threads, one learner rank's torch threads) of a local CPU run that
    generates and learns at once (``max_staleness`` >= 1); None for on-policy, GPU or joined-cluster runs."""
    g, lc = cfg.generation, cfg.learner
    if cfg.algorithm.max_staleness == 0 or g.num_gpus > 0 or lc.num_gpus > 0 or ray_address(cfg):
        return None
    return g.num_actors * g.engine_threads, lc.torch_threads or max(1, round(lc.num_cpus))


def quiet_libraries() -> None:
    """Keep this process's console to Relay's own lines: Serve's INFO lines (app started, deleted) and
    transformers' weight-loading bars go quiet; warnings and errors still print."""
    import logging

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # the driver side of a config without transformers
        pass


def _link_logs(run_dir: Path, session_dir: str) -> Path | None:
    """``<run_dir>/logs``, a link to this session's log directory (a link an earlier session left is replaced;
    anything else there is left alone, and None returned)."""
    link = Path(run_dir) / "logs"
    if link.exists() and not link.is_symlink():
        return None
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.join(session_dir, "logs"), target_is_directory=True)
    return link


def component_logs_line(session_dir: str | None, joined: bool, shown: bool, linked: Path | None = None) -> str:
    """Where the actors' and replicas' output is: ``<session_dir>/logs`` (on every node of a cluster), and the run
    directory's link to it."""
    where = os.path.join(session_dir, "logs") if session_dir else "the Ray session's logs directory"
    where += f" (linked as {linked})" if linked else ""
    nodes = " on each node (ray logs lists them)" if joined else ""
    also = "; also printed here (metrics.log_to_driver)" if shown else "; set metrics.log_to_driver=true to print " \
        "them here too"
    return f"component logs (actors, reward replicas, Serve): {where}{nodes}{also}"


def local_cpus(cfg: RelayConfig) -> int:
    """Logical CPUs of a local Ray: the machine's cores, or the most the run's actors and replicas may ask for
    (``requested(most=True)``) where that is more. Generation and learning alternate on-policy, so logical CPUs
    may exceed physical cores."""
    return max(os.cpu_count() or 1, math.ceil(requested(cfg, most=True)["CPU"] - 1e-9))


def requested(cfg: RelayConfig, most: bool = False) -> dict[str, float]:
    """Total CPUs/GPUs the learner, generation actors and reward replicas (the eval reward's too) ask for at the
    start; ``most``: the most they may ask for, the fleet grown to ``generation.max_num_actors`` and autoscaled
    reward sources at their most replicas."""
    g, lc = cfg.generation, cfg.learner
    actors = (g.max_num_actors or g.num_actors) if most else g.num_actors
    eval_sources = cfg.train.eval_reward or []
    cpus = (lc.num_cpus * lc.num_workers + actors * g.num_cpus
            + cfg.reward.ingress_num_cpus * (1 + bool(eval_sources)))
    gpus = lc.num_gpus * lc.num_workers + actors * g.num_gpus
    for s in [*cfg.reward.sources, *eval_sources]:
        if s.in_ingress:  # scored in the ingress replica: nothing of its own
            continue
        scale = s.autoscaling
        replicas = (scale.max_replicas if most else scale.min_replicas) if scale else (s.num_replicas or 1)
        cpus += replicas * s.num_cpus
        gpus += replicas * s.num_gpus
    return {"CPU": cpus, "GPU": gpus}


def check_resources(cfg: RelayConfig) -> None:
    """Raise ResourceError naming what was asked and what exists, instead of pending forever."""
    have = ray.cluster_resources()
    want = requested(cfg)
    short = {k: v for k, v in want.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        asked = ", ".join(f"{k}={v:g}" for k, v in want.items())
        exists = ", ".join(f"{k}={have.get(k, 0.0):g}" for k in want)
        raise ResourceError(
            f"the configuration asks for {asked} ({cfg.learner.num_workers} learner ranks + "
            f"{cfg.generation.num_actors} generation actors + reward "
            f"replicas) but the cluster has {exists}. Lower generation.num_actors / num_cpus / num_gpus, "
            "learner.num_workers / num_cpus / num_gpus or reward replica resources, or add nodes")
    lc = cfg.learner
    if lc.num_workers > 1:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        fits = learner_bundles_that_fit(nodes, lc.num_cpus, lc.num_gpus)
        if fits < lc.num_workers:
            raise ResourceError(
                f"the learner group needs {lc.num_workers} ranks of CPU={lc.num_cpus:g}, GPU={lc.num_gpus:g}, each on "
                f"one node, but the nodes hold only {fits} such (a placement group bundle cannot span nodes). Lower "
                "learner.num_workers or the per-rank learner.num_cpus / num_gpus, or add nodes")


def learner_bundles_that_fit(nodes: list[dict[str, float]], cpus: float, gpus: float) -> int:
    """How many learner ranks of ``cpus``/``gpus`` the nodes (their total resources) can hold, each on one node."""
    total = 0
    for have in nodes:
        per = [have.get(k, 0.0) / v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0]
        total += int(min(per) + 1e-9) if per else 1 << 20
    return total


def oversubscription_warning(cfg: RelayConfig, cores: int | None = None) -> str | None:
    """A warning when ``max_staleness > 0`` makes a local CPU run generate and learn at once with more torch
    threads than cores (measured on 2 cores with 2 + 2 threads: 1.81 s/step against 0.58 on-policy)."""
    overlapping = _overlapping_threads(cfg)
    if overlapping is None:
        return None
    engines, learner = overlapping
    threads = engines + cfg.learner.num_workers * learner  # every learner rank trains at once
    cores = cores or os.cpu_count() or 1
    if threads <= cores:
        return None
    return (f"algorithm.max_staleness={cfg.algorithm.max_staleness} runs generation and learning at once, with "
            f"{threads} torch threads on {cores} cores; oversubscribed, both slow down (2 + 2 threads on 2 cores: "
            f"3.1x slower than on-policy). Keep generation.num_actors x generation.torch_threads + "
            f"learner.num_workers x learner.torch_threads at most {cores} (on 2 cores: generation.num_actors=1, "
            f"generation.torch_threads=1, learner.torch_threads=1)")
