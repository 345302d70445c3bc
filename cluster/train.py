"""``relay train``: check the data and the run directory, find or build the policy, pin cores, start or join
Ray, and run the ``Driver`` (``cluster/driver.py``); ``--resume`` continues from the latest complete checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray

from cluster import checkpoint
from cluster.config import RelayConfig
from cluster.driver import Driver, Encoded, RunError, check_model_path, encode_data, resolve_policy
from cluster.resources import check_resources, core_layout, init_ray, oversubscription_warning, ray_address
from core.affinity import pin_process, process_cores
from core.data import load_splits

WORKER_NICENESS = "RAY_worker_niceness"
"""read by a local Ray's raylet when it starts: the niceness of the workers it starts, 15 by default"""


def train(cfg: RelayConfig, log=print, resume: bool = False) -> dict:
    """``relay train``: build or find the policy, start Ray, run the loop, return the summary. ``resume``:
    continue the run in ``train.run_dir`` from its latest complete checkpoint."""
    check_model_path(cfg)
    from core.report import check_available

    check_available(cfg.metrics.report_to)  # a missing tracker package fails now, not after minutes of start-up
    splits = load_splits(cfg.data, cfg.model.cache_dir, log=log)  # bad data fails here, before Ray starts
    data = encode_data(cfg, splits, log=log)  # and prompts too long for the context
    run_dir = Path(cfg.train.run_dir)
    checkpoint.check_writable(run_dir)
    lock = checkpoint.RunDirLock(run_dir)
    lock.acquire()  # a second job on this run_dir fails here, before it touches anything
    try:
        resume_from = _resume_point(cfg, log) if resume else None
        if resume_from is None:
            set_aside_earlier_run(run_dir, lock, log)
        if resume_from is not None and resume_from.name == "final" \
                and checkpoint.read_state(resume_from)["step"] >= cfg.train.steps:
            log(f"the run in {run_dir} already finished train.steps={cfg.train.steps}; raise it to train further")
            return json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        return _train(cfg, data, resume_from, log)
    finally:
        lock.release()


def set_aside_earlier_run(run_dir: Path, lock: checkpoint.RunDirLock, log=print) -> Path | None:
    """A new run in a ``run_dir`` that holds an earlier one (its config, metrics or a checkpoint) moves that one
    aside first, so that the two runs' metrics never share one file, whether or not the earlier one got as far as
    a checkpoint; returns where it went (None: nothing was there)."""
    resumable = checkpoint.latest(run_dir) is not None
    if not (resumable or (run_dir / "config.json").exists() or (run_dir / "metrics.jsonl").exists()):
        return None
    moved = checkpoint.move_aside(run_dir, lock)
    log(f"train.run_dir {run_dir} held an earlier run; moved it to {moved} "
        + (f"(continue that one with relay train --resume {moved})" if resumable else
           "(it wrote no checkpoint, so it cannot be resumed)"))
    return moved


def _train(cfg: RelayConfig, data: Encoded, resume_from: Path | None, log) -> dict:
    cores = process_cores()
    layout = None if ray.is_initialized() else core_layout(cfg, cores)
    niceness = os.environ.get(WORKER_NICENESS)
    if layout:  # before a local Ray starts: its daemons and workers inherit this mask
        pin_process(layout["rest"])
        # Ray starts its workers at nice 15 and its daemons at this process's 0. On the shared cores the learner
        # (a worker) then yields to every wake-up of the driver, GCS, raylet and dashboard agent, even while they
        # only do background work: one niceness for all (as Ray's job manager does for job drivers). Measured on 2
        # cores, streaming 1+1, 25 s windows alternating in one run: learner step 0.187 and 0.213 s against 0.222
        # and 0.218 s, loop step 0.239 and 0.258 s against 0.268 and 0.272 s.
        os.environ[WORKER_NICENESS] = "0" if niceness is None else niceness  # a user's own setting stands
        log(f"pinned the driver, the learner, the reward replicas and Ray's daemons to cores {layout['rest']}, "
            f"the generation actors to {layout['actors']} (cluster.pin_cores)")
    try:
        return _run_on_ray(cfg, data, resume_from, log, layout)
    finally:
        if layout:
            pin_process(cores)  # this process may outlive the run (tests, notebooks)
            if niceness is None:
                os.environ.pop(WORKER_NICENESS, None)
            else:
                os.environ[WORKER_NICENESS] = niceness


def _run_on_ray(cfg: RelayConfig, data: Encoded, resume_from: Path | None, log, layout: dict | None) -> dict:
    connected = init_ray(cfg, log=log, log_to_driver=cfg.metrics.log_to_driver, link_logs=Path(cfg.train.run_dir))
    try:
        check_resources(cfg)  # before minutes of SFT, so an impossible request fails at once
        if warning := oversubscription_warning(cfg):
            log(f"warning: {warning}")
        policy_path = resolve_policy(cfg, log=log)
        if resume_from is not None:
            check_same_model(resume_from, policy_path)
        driver = Driver(cfg, policy_path, data, log=log, resume_from=resume_from,
                        layout=layout)
        driver.start()
        try:
            return driver.run()
        finally:
            driver.shutdown(stop_serve=not connected or bool(ray_address(cfg)))  # a local Ray takes Serve with it
    finally:
        if connected:
            ray.shutdown()


def _resume_point(cfg: RelayConfig, log) -> Path:
    run_dir = Path(cfg.train.run_dir)
    found = checkpoint.latest(run_dir)
    if found is None:
        staged = sorted(p.name for p in checkpoint.checkpoints_dir(run_dir).glob(".*")) \
            if checkpoint.checkpoints_dir(run_dir).is_dir() else []
        raise RunError(f"--resume: {run_dir} has no complete checkpoint to continue from"
                       + (f" (only unfinished writes: {staged})" if staged else "")
                       + "; start the run without --resume")
    log(f"resuming from {found}")
    return found


def check_same_model(ckpt: Path, reference: str) -> None:
    """A checkpoint must be of the model the run starts from (same architecture and sizes)."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    ours = json.loads((ckpt / "config.json").read_text())
    theirs = json.loads((Path(reference) / "config.json").read_text())
    diff = [f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in keys if ours.get(k) != theirs.get(k)]
    if diff:
        raise RunError(f"checkpoint {ckpt} is of another model than {reference} ({'; '.join(diff)}); resume it with "
                       "the model it was trained from, or start a new train.run_dir")
