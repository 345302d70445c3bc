"""The loop against its limit: bare generation and learner timings, and the on-policy and streaming loops.

    python benchmarks/bench_loop.py [--seconds 150] [--skip-bare] [--skip-loops]

Everything on the embedded default (tiny Qwen2, 64 prompts x 8 samples a step), side by side in one run:

- bare, in one process without Ray, with 1 and with 2 torch threads: vLLM's ``LLM.generate`` alone; the
  same call through Relay's ``GenerationActor.generate`` (the engine plus Relay's rollout building, no Ray
  hop); Hugging Face ``generate`` on the same model and batch; one learner step (``Learner.train_step``)
  on the batch, scored by exact match. Medians over ``--repeats`` batches.
- bare, two engines: two processes, each pinned to a core of its own with one thread, each sampling its half
  of every batch at the same moment (Relay's default fleet, without Ray); per batch the slower half.
- loops, each a ``relay train`` of ``--seconds`` with evaluation only at the ends: on-policy as configured
  by default (two single-thread engines, one per core, and a 2-thread learner: generation and learning
  alternate), on-policy with one 2-thread engine (the default before), and streaming
  (``algorithm.max_staleness=1``) with one engine thread and one learner thread on disjoint cores, and the
  same with two steps of staleness (``streaming 1+1 s2``: room for a slow step on either side). The median step
  time after the first 10 steps.

The limits: on-policy, bare two-engine generation plus the bare learner at 2 threads; streaming, the larger
of one-thread generation and the one-thread learner, measured right before the streaming loop (which runs
first) and again right after it; and, as this machine's speed drifts by 10-50% within minutes, once more with
the limit measured inside a second run of each streaming loop, which is frozen every few seconds for bare steps
on its own cores (``benchmarks/interleaved.py``). Writes
``benchmarks/results/loop/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "loop"


def machine() -> str:
    """The cores and the CPU's model name (this project's machines differ between sessions)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return f"{os.cpu_count()} cores ({model}), no GPU"


def _config(threads: int, overrides: tuple[str, ...] = ()):
    from cluster.config import load_config

    threads_each = [f"generation.torch_threads={threads}", f"learner.torch_threads={threads}"]
    return load_config(overrides=[*overrides, *threads_each])


def _setup(threads: int, overrides: tuple[str, ...] = ()):
    """Config, policy path, encoded data and a Relay generation actor (no Ray), with ``threads`` torch threads
    for both sides (call in a fresh process: the thread count is global) and the loop's ``overrides``."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch

    torch.set_num_threads(threads)
    from actors.generation import GenerationActor
    from cluster.driver import encode_data, resolve_policy
    from core.data import load_splits

    cfg = _config(threads, overrides)
    path = resolve_policy(cfg, log=lambda *_: None)
    data = encode_data(cfg, load_splits(cfg.data, cfg.model.cache_dir, log=lambda *_: None), log=lambda *_: None)
    return cfg, path, data, GenerationActor(cfg.generation, path, cfg.model.dtype)


def _learner(cfg, path: str):
    from learner.learner import Learner

    g = cfg.generation
    return Learner(path, cfg.algorithm, cfg.learner, cfg.model.dtype, g.temperature, g.max_tokens,
                   reference_path=path, seed=0)


def _scored(rollouts: list) -> list:
    """The rollouts scored by exact match, as the default task's reward does."""
    from core.data import exact_match
    from core.records import ScoredRollout

    return [ScoredRollout(r, float(exact_match(r.response_text, r.metadata["answer"]))) for r in rollouts]


def bare(threads: int, repeats: int) -> dict:
    """Bare timings with ``threads`` torch threads."""
    cfg, path, data, actor = _setup(threads)
    learner = _learner(cfg, path)
    g, per_step = cfg.generation, cfg.train.prompts_per_step
    batches = [data.train[i * per_step:(i + 1) * per_step] for i in range(repeats + 1)]
    params = actor._sampling(g.samples_per_prompt, greedy=False)
    engine, relay, tokens, learn = [], [], [], []
    for i, prompts in enumerate(batches):
        t = time.perf_counter()
        outs = actor.llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params, use_tqdm=False)
        engine.append(time.perf_counter() - t)
        tokens.append(sum(len(o.token_ids) for out in outs for o in out.outputs))
        t = time.perf_counter()
        result = actor.generate(prompts)
        relay.append(time.perf_counter() - t)
        scored = _scored(result.rollouts)
        t = time.perf_counter()
        learner.train_step(scored)
        learn.append(time.perf_counter() - t)
        if i == 0:  # warm-up
            engine, relay, tokens, learn = [], [], [], []
    hf = hf_generate(path, batches[1], g, threads)
    med = statistics.median
    return {"threads": threads, "engine_s": med(engine), "relay_actor_s": med(relay), "learner_s": med(learn),
            "hf_generate_s": hf, "tokens_per_step": med(tokens)}


def corun(rounds: int) -> dict:
    """One-thread generation (Relay's actor, no Ray hop) and learner, each pinned to a core of its own (the
    streaming layout), timed alone and while the other works, alternating in windows: what a neighbour on the
    other core costs each side here (whatever the two share: caches, memory bandwidth, the host), apart from
    anything Relay does. Needs 2 cores."""
    import multiprocessing

    os.sched_setaffinity(0, {0})
    cfg, path, data, actor = _setup(1)
    per_step = cfg.train.prompts_per_step
    batches = [data.train[i * per_step:(i + 1) * per_step] for i in range(4)]
    scored = _scored(actor.generate(batches[0]).rollouts)
    ctx = multiprocessing.get_context("spawn")
    mode, stop, times = ctx.Value("i", 0), ctx.Event(), ctx.Queue()  # mode: 0 idle, 1 learner alone, 2 both
    child = ctx.Process(target=_learner_loop, args=(path, scored, mode, stop, times))
    child.start()
    try:
        engine = {"alone": [], "both": []}
        for _ in range(rounds):
            for m, label in ((0, "alone"), (1, None), (2, "both")):
                mode.value = m
                time.sleep(1.0)  # the learner settles into (or out of) its steps
                for prompts in batches:
                    if label is None:
                        time.sleep(0.3)  # learner alone: the engine waits
                        continue
                    t = time.perf_counter()
                    actor.generate(prompts)
                    engine[label].append(time.perf_counter() - t)
        mode.value = 0
        stop.set()
        learner = times.get(timeout=600)
    finally:
        _reap([child])
    med = statistics.median
    return {"engine_alone_s": med(engine["alone"]), "engine_both_s": med(engine["both"]),
            "learner_alone_s": med(learner["1"]), "learner_both_s": med(learner["2"])}


def _learner_loop(path: str, scored: list, mode, stop, times) -> None:
    """``corun``'s other side, on core 1: learner steps on one batch while ``mode`` is 1 or 2, each timed and
    kept under the mode it ran in throughout."""
    os.sched_setaffinity(0, {1})
    import torch

    torch.set_num_threads(1)
    learner = _learner(_config(1), path)
    learner.train_step(scored)  # warm-up
    out: dict[str, list[float]] = {"1": [], "2": []}
    while not stop.is_set():
        m = mode.value
        if m == 0:
            time.sleep(0.01)
            continue
        t = time.perf_counter()
        learner.train_step(scored)
        if mode.value == m:
            out[str(m)].append(time.perf_counter() - t)
    times.put(out)


def two_engines(repeats: int) -> dict:
    """Relay's default fleet without Ray: two single-thread engines on cores of their own, each sampling half
    of every batch at once (a barrier starts each batch on both). Per batch the slower half: one step's
    generation. Needs 2 cores."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier, times = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_half_engine, args=(i, repeats, barrier, times)) for i in range(2)]
    for c in children:
        c.start()
    try:
        halves = dict(times.get(timeout=900) for _ in children)
    finally:
        _reap(children)
    per_batch = [max(a, b) for a, b in zip(halves[0], halves[1], strict=True)]
    return {"engines_s": statistics.median(per_batch), "half_s": [statistics.median(halves[i]) for i in (0, 1)]}


def _half_engine(index: int, repeats: int, barrier, times) -> None:
    """``two_engines``' side ``index``: pinned to core ``index``, one thread, the ``index``-th of two shards of
    each batch, as the fleet splits it."""
    from cluster.fleet import contiguous_shards

    os.sched_setaffinity(0, {index})
    cfg, _, data, actor = _setup(1)
    per_step = cfg.train.prompts_per_step
    out = []
    for i in range(repeats + 1):
        half = contiguous_shards(data.train[i * per_step:(i + 1) * per_step], 2)[index]
        barrier.wait(timeout=600)
        t = time.perf_counter()
        actor.generate(half)
        if i:  # the first is the warm-up
            out.append(time.perf_counter() - t)
    times.put((index, out))


def _reap(children: list) -> None:
    """Join this script's measurement processes; kill one that does not end."""
    for c in children:
        c.join(timeout=60)
        if c.is_alive():
            c.kill()


def _measure(*args: str) -> dict:
    """One of this script's internal measurements in a fresh process; its JSON line."""
    out = subprocess.run([sys.executable, __file__, *args], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_generate(path: str, prompts: list, g, threads: int, repeats: int = 3) -> float:
    """Hugging Face ``generate`` on the same batch (left-padded prompts, n samples each, same sampling)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    width = max(len(p.token_ids) for p in prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p.token_ids)) + p.token_ids for p in prompts
                        for _ in range(g.samples_per_prompt)])
    mask = (torch.arange(width) >= (width - torch.tensor([len(p.token_ids) for p in prompts
                                                          for _ in range(g.samples_per_prompt)])).unsqueeze(1)).long()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=g.temperature, top_p=g.top_p,
                           max_new_tokens=g.max_tokens, pad_token_id=pad)
            times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def relay_train(run_dir: Path, seconds: float, overrides: list[str], evaluate: bool = True,
                while_running: Callable[[subprocess.Popen], None] | None = None) -> list[dict]:
    """A ``relay train`` of ``seconds`` in a subprocess, with the default evaluations or (``evaluate`` false) only
    at the ends; the rows of its metrics.jsonl. ``while_running(process)``: called once it has started, returns
    when it has ended."""
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--set", f"train.time_limit_s={seconds}",
           "--set", f"train.run_dir={run_dir}", "--set", "metrics.progress=false",
           *(() if evaluate else ("--set", "train.eval_every=100000")), *[a for o in overrides for a in ("--set", o)]]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            if while_running:
                while_running(proc)
            proc.wait(timeout=seconds + 600)
        finally:
            if proc.poll() is None:
                proc.kill()
    if proc.returncode:
        raise RuntimeError(f"relay train ({' '.join(overrides)}) exited with {proc.returncode}; its logs: {run_dir}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def eval_curve(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(step, seconds after the first row when that step was trained, held-out score) per evaluation."""
    t0 = rows[0]["time"]
    step_time = {r["step"]: r["time"] - t0 for r in rows if "system/step_seconds" in r} | {0: 0.0}
    return sorted((r["step"], step_time.get(r["step"], 0.0), r["eval/task_score"]) for r in rows
                  if r.get("eval/task_score") is not None)


def loop(name: str, overrides: list[str], seconds: float) -> dict:
    started = time.perf_counter()
    rows = relay_train(Path("/tmp/relay-bench-loop") / name, seconds, overrides, evaluate=False)
    wall = time.perf_counter() - started
    steps = [r for r in rows if "system/step_seconds" in r and r["step"] > 10]

    def median(key: str) -> float | None:
        values = [r[key] for r in steps if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"name": name, "overrides": overrides, "steps": max(r["step"] for r in rows), "wall_s": wall,
            "step_s": median("system/step_seconds"), "learner_s": median("learner/step_seconds{phase=total}"),
            "wait_s": median("rollout/wait_seconds"), "swap_s": median("sync/swap_seconds"),
            "sync_s": median("sync/seconds"), "staleness": median("rollout/staleness_versions")}


def _span(values: list) -> str:
    """``a-b`` over the values that are not None, or "not recorded"."""
    values = [v for v in values if v is not None]
    return f"{min(values):.2f}-{max(values):.2f}" if values else "not recorded"


def learning(name: str, overrides: list[str], seconds: float) -> dict:
    """A ``relay train`` of ``seconds`` with the default evaluations: held-out score against wall time."""
    run_dir = Path("/tmp/relay-bench-loop") / f"learn-{name}"
    rows = relay_train(run_dir, seconds, overrides)
    return {"overrides": overrides, "summary": json.loads((run_dir / "summary.json").read_text()),
            "curve": eval_curve(rows), "date": time.strftime("%Y-%m-%d")}


def plot_learning(curves: dict[str, tuple[list, int]], path: Path, xlabel: str) -> None:
    """Held-out score against seconds, one line per ``label: (curve, steps)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (curve, steps) in curves.items():
        _, seconds, scores = zip(*curve, strict=True)
        ax.plot(seconds, scores, marker=".", label=f"{label} ({steps} steps)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out greedy score")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DEFAULT, ONE_ENGINE, STREAMING, STREAMING_S2 = "on-policy 2x1+2", "on-policy 1x2+2", "streaming 1+1", "streaming 1+1 s2"
LOOPS = {  # engines x threads each + learner threads
    DEFAULT: [],
    ONE_ENGINE: ["generation.num_actors=1", "generation.torch_threads=2"],
    STREAMING: ["algorithm.max_staleness=1", "generation.num_actors=1", "learner.torch_threads=1"],
    # two steps of room between the sides: a slow step on one side need not stall the other
    STREAMING_S2: ["algorithm.max_staleness=2", "generation.num_actors=1", "learner.torch_threads=1"],
}
STREAMING_LOOPS = (STREAMING, STREAMING_S2)


def _loop_names(arg: str) -> list[str]:
    """The loops named in a comma-separated ``arg``; an unknown name is an error that lists the known ones."""
    names = [n.strip() for n in arg.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOOPS]
    if unknown:
        raise SystemExit(f"unknown loop(s) {unknown}: the loops are {list(LOOPS)}")
    return names


def _run_name(loop_name: str) -> str:
    """A loop's name as a run directory: ``on-policy 2x1+2`` -> ``on-policy_2x1-2``."""
    return loop_name.replace(" ", "_").replace("+", "-")


def table(results: dict) -> str:
    sections = (_bare_table(results), _loops_table(results), _limits_text(results), _interleaved_text(results),
                _corun_table(results), _learning_table(results))
    return "\n\n".join(s for s in sections if s)


def _bare_table(results: dict) -> str:
    b1, b2 = results.get("bare", {}).get("1"), results.get("bare", {}).get("2")
    if not (b1 and b2):
        return ""
    lines = ["| bare, per step (64 prompts x 8) | 1 thread | 2 threads |", "|---|---|---|"]
    for key, label in (("engine_s", "vLLM `LLM.generate`"), ("relay_actor_s", "Relay `GenerationActor.generate` "
                                                                               "(no Ray hop)"),
                       ("hf_generate_s", "HF `generate`"), ("learner_s", "learner step")):
        lines.append(f"| {label} | {b1[key]:.3f} s | {b2[key]:.3f} s |")
    lines.append(f"| engine / Relay actor throughput | {b1['engine_s'] / b1['relay_actor_s']:.2f}x | "
                 f"{b2['engine_s'] / b2['relay_actor_s']:.2f}x |")
    return "\n".join(lines)


def _loops_table(results: dict) -> str:
    loops = results.get("loops", {})
    if not loops:
        return ""
    lines = ["| loop | steps | median step | learner | waited for rollouts | swap | staleness |",
             "|---|---|---|---|---|---|---|"]
    for name, r in loops.items():
        fmt = lambda v: "" if v is None else f"{v:.3f} s"  # noqa: E731
        lines.append(f"| {name} | {r['steps']} | {fmt(r['step_s'])} | {fmt(r['learner_s'])} | {fmt(r['wait_s'])} "
                     f"| {fmt(r['swap_s'])} | {'' if r['staleness'] is None else int(r['staleness'])} |")
    return "\n".join(lines)


def _limits_text(results: dict) -> str:
    """The limits per step and each loop against its own; also fills ``results["limits"]``."""
    b1, b2 = results.get("bare", {}).get("1"), results.get("bare", {}).get("2")
    two, co, loops = results.get("two_engines"), results.get("corun"), results.get("loops", {})
    if not (b1 and b2 and two):
        return ""
    lines = [f"Two single-thread engines on cores of their own, half of each batch each: {two['engines_s']:.3f} s a "
             f"batch (the halves {two['half_s'][0]:.3f} and {two['half_s'][1]:.3f} s), "
             f"**{b2['relay_actor_s'] / two['engines_s']:.2f}x** one 2-thread engine."]
    if not (DEFAULT in loops and STREAMING in loops):
        return "\n".join(lines)
    sync_limit = two["engines_s"] + b2["learner_s"]
    async_limit = max(b1["relay_actor_s"], b1["learner_s"])
    default, streaming = loops[DEFAULT]["step_s"], loops[STREAMING]["step_s"]
    results["limits"] = lim = {
        "sync_limit_s": sync_limit, "async_limit_s": async_limit, "speedup_bound": sync_limit / async_limit,
        "speedup": default / streaming, "streaming_of_limit": async_limit / streaming,
        "on_policy_of_limit": sync_limit / default}
    lines += ["", f"Limits per step: on-policy, bare two-engine generation + the bare learner at 2 threads = "
                  f"{sync_limit:.3f} s (the default loop reaches **{100 * lim['on_policy_of_limit']:.0f}%** of it); "
                  f"streaming, the larger of generation and learner at 1 thread = {async_limit:.3f} s (the loop "
                  f"reaches **{100 * lim['streaming_of_limit']:.0f}%** of it). Streaming 1+1 against the default "
                  f"on-policy loop: **{lim['speedup']:.2f}x** the steps per second (the limits alone would give "
                  f"{lim['speedup_bound']:.2f}x)."]
    if ONE_ENGINE in loops:
        lim["default_over_one_engine"] = loops[ONE_ENGINE]["step_s"] / default
        lines.append(f"The default on-policy loop against the same loop with one 2-thread engine: "
                     f"**{lim['default_over_one_engine']:.2f}x** the steps per second.")
    after = results.get("bare_after", {}).get("1")
    if after:
        limit_after = max(after["relay_actor_s"], after["learner_s"])
        mean = (async_limit + limit_after) / 2
        lim.update(async_limit_after_s=limit_after, streaming_of_limit_after=limit_after / streaming,
                   streaming_of_limit_mean=mean / streaming)
        lines.append(f"The streaming loop ran between two measurements of its limit: {async_limit:.3f} s right "
                     f"before it, {limit_after:.3f} s right after (the loop reaches "
                     f"{100 * lim['streaming_of_limit_after']:.0f}% of the second, **"
                     f"{100 * lim['streaming_of_limit_mean']:.0f}%** of their mean).")
    if STREAMING_S2 in loops:  # run right after the second measurement of the limit, when there is one
        s2, s2_limit = loops[STREAMING_S2]["step_s"], lim.get("async_limit_after_s", async_limit)
        when = "right before it" if "async_limit_after_s" in lim else "before the streaming loops"
        lim.update(speedup_s2=default / s2, streaming_s2_of_limit=s2_limit / s2, s2_over_s1=streaming / s2)
        lines.append(f"With two steps of staleness (`{STREAMING_S2}`): **{lim['speedup_s2']:.2f}x** the default "
                     f"loop's steps per second and {lim['s2_over_s1']:.2f}x staleness 1's; **"
                     f"{100 * lim['streaming_s2_of_limit']:.0f}%** of the limit measured {when} ({s2_limit:.3f} s).")
    if co:  # what generation can do while the learner works on the other core
        lim["streaming_of_corun"] = co["engine_both_s"] / streaming
        lines.append(f"Against one-thread generation beside a working learner ({co['engine_both_s']:.3f} s, "
                     f"measured before the loops; {co['engine_alone_s']:.3f} s alone then) the loop reaches "
                     f"{100 * lim['streaming_of_corun']:.0f}%.")
    return "\n".join(lines)


def interleaved_runs(results: dict) -> dict[str, dict]:
    """The interleaved figures by streaming loop; results written before there was one run per streaming loop held
    a single run, of staleness 1."""
    runs = results.get("interleaved") or {}
    return {STREAMING: runs} if "stretches" in runs else runs


def _interleaved_text(results: dict) -> str:
    lines = []
    for name, inter in interleaved_runs(results).items():
        limits = [s["limit_s"] for s in inter["stretches"]]
        lines.append(f"{name.capitalize()} with its limit measured inside it (frozen every few seconds for "
                     f"{len(inter['freezes'])} bare measurements on its own cores; `benchmarks/interleaved.py`): the "
                     f"limit ranged {min(limits):.3f}-{max(limits):.3f} s over the run (generation "
                     f"{inter['generation_s']:.3f} s, learner {inter['learner_s']:.3f} s, medians; the learner on "
                     f"steps with the loop's share of mixed groups, {_span([k for _, k in inter.get('kept', [])])}), "
                     f"the loop's step {inter['step_s']:.3f} s. Over {len(inter['stretches'])} stretches between "
                     f"freezes the loop reaches **{100 * inter['of_limit_median']:.0f}%** of its limit (median; "
                     f"{100 * inter['of_limit_time']:.0f}% of the time the limit allows over all their steps).")
    return "\n\n".join(lines)


def _corun_table(results: dict) -> str:
    co = results.get("corun")
    if not co:
        return ""
    return "\n".join(["| 1 thread each, own cores | alone | while the other works |", "|---|---|---|",
                      f"| Relay `GenerationActor.generate` | {co['engine_alone_s']:.3f} s | "
                      f"{co['engine_both_s']:.3f} s |",
                      f"| learner step | {co['learner_alone_s']:.3f} s | {co['learner_both_s']:.3f} s |"])


def _learning_table(results: dict) -> str:
    if not results.get("learning"):
        return ""
    lines = ["| loop, default evaluations | run on | steps | held-out start | last three evaluations | gain |",
             "|---|---|---|---|---|---|"]
    for name, run in results["learning"].items():
        sm = run["summary"]
        lines.append(f"| {name} | {run.get('date', '')} | {sm['steps']} | {sm['eval_start']:.3f} | "
                     f"{sm['eval_last3_mean']:.3f} | {sm['eval_gain_points']:+.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-loops", action="store_true")
    p.add_argument("--loops", default=",".join(LOOPS), help="which loops to run (comma-separated names of LOOPS)")
    p.add_argument("--learning", type=float, help="also run the --learning-loops for this many seconds with the "
                   "default evaluations, and plot held-out score against wall time")
    p.add_argument("--learning-loops", default=f"{DEFAULT},{STREAMING}",
                   help="which loops --learning runs (comma-separated names of LOOPS; earlier runs of others are kept)")
    p.add_argument("--bare-only", type=int, help=argparse.SUPPRESS)  # internal: one bare measurement, JSON out
    p.add_argument("--corun-only", action="store_true", help=argparse.SUPPRESS)  # internal: as --bare-only
    p.add_argument("--two-engines-only", action="store_true", help=argparse.SUPPRESS)  # internal: as --bare-only
    args = p.parse_args()
    names, learning_names = _loop_names(args.loops), _loop_names(args.learning_loops)  # a typo fails now, not later
    if args.bare_only:
        print(json.dumps(bare(args.bare_only, args.repeats)))
        return
    if args.corun_only:
        print(json.dumps(corun(rounds=3)))
        return
    if args.two_engines_only:
        print(json.dumps(two_engines(args.repeats)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["machine"] = machine()
    results["date"] = time.strftime("%Y-%m-%d")
    # This machine's speed drifts by 10-50% within minutes, so the streaming loop runs between two measurements of
    # its limit (the bare 1-thread timings): the last bare measurement before it, and one right after it.
    if not args.skip_bare:
        results["bare"] = {}
        if (os.cpu_count() or 1) >= 2:
            results["two_engines"] = _measure("--two-engines-only", "--repeats", str(args.repeats))
            print(f"bare, two single-thread engines: {results['two_engines']}", flush=True)
            results["corun"] = _measure("--corun-only")
            print(f"side by side, 1 thread each: {results['corun']}", flush=True)
        for threads in (2, 1):
            results["bare"][str(threads)] = _measure("--bare-only", str(threads), "--repeats", str(args.repeats))
            print(f"bare, {threads} thread(s): {results['bare'][str(threads)]}", flush=True)
    if not args.skip_loops:
        results["loops"] = {k: v for k, v in results.get("loops", {}).items() if k in LOOPS}  # drop retired layouts
        order = list(LOOPS)
        # the streaming loops first, in LOOPS' order: staleness 1 next to its limit, staleness 2 right after the
        # limit's second measurement
        for name in sorted(names, key=lambda n: (n not in STREAMING_LOOPS, order.index(n))):
            results["loops"][name] = loop(_run_name(name), LOOPS[name], args.seconds)
            print(f"{name}: {results['loops'][name]}", flush=True)
            if name == STREAMING and not args.skip_bare:
                results["bare_after"] = {"1": _measure("--bare-only", "1", "--repeats", str(args.repeats))}
                print(f"bare again right after the streaming loop, 1 thread: {results['bare_after']['1']}", flush=True)
        if not args.skip_bare and (os.cpu_count() or 1) >= 2:
            from benchmarks.interleaved import interleaved

            results["interleaved"] = interleaved_runs(results)
            for name in (n for n in STREAMING_LOOPS if n in names):
                results["interleaved"][name] = interleaved(args.seconds, LOOPS[name], _run_name(name) + "-interleaved")
                print(f"{name} with its limit inside it: {results['interleaved'][name]['of_limit_median']:.3f}",
                      flush=True)
    if args.learning:
        results["learning"] = results.get("learning", {}) | {
            name: learning(_run_name(name), LOOPS[name], args.learning) for name in learning_names}
        plot_learning({name: (run["curve"], run["summary"]["steps"]) for name, run in results["learning"].items()},
                      OUT / "learning.png", "seconds of RL (when the evaluated step was trained)")
    md = table(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
