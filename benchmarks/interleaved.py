"""The streaming loop with its limit measured inside it (``benchmarks/bench_loop.py`` runs it).

This machine's speed drifts by 10-50% within minutes, so a limit measured before or after a loop can be far
from the limit while it ran. ``interleaved`` runs a streaming ``relay train`` and every few seconds freezes its
whole process tree (SIGSTOP, Ray's daemons included) to time bare one-thread generation and learner steps on
the loop's own cores, with nothing else running; ``interleaved_figures`` holds each stretch of the loop between
two freezes against the limit measured at its two ends.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.bench_loop import _config, _learner, _reap, _scored, _setup, relay_train


def interleaved(seconds: float, overrides: list[str], name: str = "interleaved", every: float = 8.0,
                repeats: int = 3) -> dict:
    """The streaming loop of ``overrides`` with its limit measured inside it (run directory
    ``/tmp/relay-bench-loop/<name>``). Every ``every`` seconds the whole ``relay train`` process tree is frozen
    (SIGSTOP: every process of the loop stops where it is, Ray's daemons included, so nothing of it runs),
    ``repeats`` bare steps are timed on the loop's own cores, one side at a time, with nothing else running:
    one-thread generation (Relay's actor, no Ray hop) on the generation actor's core, then the one-thread learner on
    the learner's core; then the loop goes on (SIGCONT). The learner's work grows as the policy learns: groups whose
    samples all score alike are dropped (``algorithm.drop_uniform_groups``), and fewer are as the task score rises.
    So the bare learner trains on a step of 64 groups with as many mixed ones as the loop kept since the last freeze
    (``learner/kept_fraction``), drawn from a pool the start policy sampled. The limit of the loop's steps between
    two freezes is the mean of the larger side's median at the two; a step that overlaps a freeze (or ends within
    0.5 s after one) is left out of the loop's figures."""
    import multiprocessing

    import psutil

    from cluster.config import load_config
    from cluster.resources import core_layout

    layout = core_layout(load_config(overrides=overrides), list(range(os.cpu_count() or 1)))
    if layout is None:
        raise RuntimeError("the interleaved measurement needs the streaming layout's disjoint cores (2 or more)")
    ctx = multiprocessing.get_context("spawn")
    gen_end, gen_side = ctx.Pipe()
    learn_end, learn_side = ctx.Pipe()
    sides = [ctx.Process(target=_bare_side, args=("generation", layout["actors"][0], gen_side, tuple(overrides))),
             ctx.Process(target=_bare_side, args=("learner", layout["rest"], learn_side, tuple(overrides)))]
    for side in sides:
        side.start()
    freezes: list[dict] = []
    run_dir = Path("/tmp/relay-bench-loop") / name
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's rows would start the freezes too soon

    def measure(proc: subprocess.Popen) -> None:
        while proc.poll() is None and not _steps_past(run_dir / "metrics.jsonl", 10):
            time.sleep(0.5)
        while proc.poll() is None:
            time.sleep(every)
            try:
                tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            kept = _kept_since(run_dir / "metrics.jsonl", freezes[-1]["end"] if freezes else 0.0)
            start = time.time()
            try:
                _signal(tree, "suspend")
                time.sleep(0.1)  # every process of the loop off its core
                gen_end.send(repeats)
                generation = _answer(gen_end)
                learn_end.send((repeats, kept))
                learner, mixed = _answer(learn_end)
            finally:
                _signal(tree, "resume")
            freezes.append({"start": start, "end": time.time(), "generation_s": statistics.median(generation),
                            "learner_s": statistics.median(learner), "loop_kept": kept, "bare_kept": mixed})

    try:
        gen_end.send("scored")
        learn_end.send(_answer(gen_end))  # the learner side's pool: the generation side's first batches, scored
        _answer(learn_end)  # warmed up
        rows = relay_train(run_dir, seconds, overrides, evaluate=False, while_running=measure)
    finally:
        for end in (gen_end, learn_end):
            try:
                end.send(None)
            except (BrokenPipeError, OSError):  # that side has ended already
                continue
        _reap(sides)
    return interleaved_figures(rows, freezes)


def interleaved_figures(rows: list[dict], freezes: list[dict], guard: float = 0.5) -> dict:
    """Per stretch between two freezes: the loop's median step against the mean of the two limits around it."""
    steps = [(r["time"] - r["system/step_seconds"], r["time"], r["system/step_seconds"]) for r in rows
             if "system/step_seconds" in r and r["step"] > 10]
    stretches = []
    for before, after in zip(freezes, freezes[1:], strict=False):
        inside = [s for start, end, s in steps if start >= before["end"] + guard and end <= after["start"]]
        if len(inside) < 3:
            continue
        limit = (max(before["generation_s"], before["learner_s"]) + max(after["generation_s"], after["learner_s"])) / 2
        stretches.append({"steps": len(inside), "step_s": statistics.median(inside), "limit_s": limit,
                          "of_limit": limit / statistics.median(inside), "seconds": sum(inside),
                          "limit_seconds": limit * len(inside)})
    if not stretches:
        raise RuntimeError("no stretch of the interleaved loop had 3 steps between two freezes: run it longer")
    return {"freezes": freezes, "stretches": stretches,
            "of_limit_median": statistics.median(s["of_limit"] for s in stretches),
            "of_limit_time": sum(s["limit_seconds"] for s in stretches) / sum(s["seconds"] for s in stretches),
            "generation_s": statistics.median(f["generation_s"] for f in freezes),
            "learner_s": statistics.median(f["learner_s"] for f in freezes),
            "step_s": statistics.median(s["step_s"] for s in stretches),
            "kept": [(f.get("loop_kept"), f.get("bare_kept")) for f in freezes]}


def _bare_side(side: str, cores: list[int], conn, overrides: tuple[str, ...]) -> None:
    """``interleaved``'s bare measurements, pinned to ``cores`` with one thread and the loop's ``overrides``
    (its learner's precision, say). Generation side: on "scored" sample four batches and answer (policy path,
    their scored groups); on a number k time k steps and answer their seconds. Learner side: on a (path, groups)
    pair build the learner and answer when warm; on (k, kept) time k steps, each on 64 groups of which a fraction
    ``kept`` (None: as sampled) have rewards that differ, and answer (their seconds, the fraction they had). On
    None end."""
    from cluster.rollout_buffer import Group, by_group, informative
    from core.affinity import pin_process

    pin_process(cores)
    if side == "generation":
        cfg, path, data, actor = _setup(1, overrides)
        per_step = cfg.train.prompts_per_step
        batches = [data.train[i * per_step:(i + 1) * per_step] for i in range(4)]
    while (ask := conn.recv()) is not None:
        if ask == "scored":
            groups = [g for b in batches for g in by_group(_scored(actor.generate(b).rollouts)).values()]
            conn.send((path, [Group(-1, g) for g in groups]))  # as the buffer holds them (no prompt index here)
        elif side == "learner" and isinstance(ask[0], str):
            import torch

            torch.set_num_threads(1)
            path, pool = ask
            mixed = [g for g in pool if informative(g)]
            uniform = [g for g in pool if not informative(g)]
            learner = _learner(_config(1, overrides), path)
            learner.train_step([s for g in pool[:64] for s in g.samples])
            conn.send("warm")
        elif side == "learner":
            count, kept = ask
            n = 64 if kept is None else min(round(kept * 64), len(mixed))
            groups = (pool[:64] if kept is None else mixed[:n] + uniform[:64 - n])
            times = []
            for _ in range(count):
                t = time.perf_counter()
                learner.train_step([s for g in groups for s in g.samples])
                times.append(time.perf_counter() - t)
            conn.send((times, sum(map(informative, groups)) / len(groups)))
        else:
            times = []
            for i in range(ask):
                t = time.perf_counter()
                actor.generate(batches[i % len(batches)])
                times.append(time.perf_counter() - t)
            conn.send(times)


def _kept_since(path: Path, since: float) -> float | None:
    """The mean ``learner/kept_fraction`` of the loop's steps logged after ``since`` (past step 10); None if none."""
    from core.metrics import read_jsonl

    try:
        rows = read_jsonl(path)  # skips the line being written
    except OSError:
        return None
    kept = [r["learner/kept_fraction"] for r in rows
            if r.get("step", 0) > 10 and r.get("time", 0.0) > since and "learner/kept_fraction" in r]
    return statistics.mean(kept) if kept else None


def _answer(conn, timeout: float = 600.0):
    if not conn.poll(timeout):
        raise TimeoutError(f"a bare measurement did not answer in {timeout:.0f} s")
    return conn.recv()


def _signal(processes: list, action: str) -> None:
    """``suspend`` or ``resume`` each of ``processes`` (psutil), skipping any that has ended."""
    import psutil

    for process in processes:
        try:
            getattr(process, action)()
        except psutil.NoSuchProcess:
            continue


def _steps_past(path: Path, step: int) -> bool:
    """Whether the metrics file at ``path`` has a row past ``step``."""
    from core.metrics import read_jsonl

    try:
        rows = read_jsonl(path)  # skips the line being written
    except OSError:
        return False
    return any(r.get("step", 0) > step for r in rows)

