"""Where an RL step's reward-model scoring time goes: the Ray Serve hop against the bare forward pass.

Scores the same T addition texts (half with the correct answer, half with a wrong one) every step, four
ways, in a rotating order per step so that machine noise hits every path alike:

- ``bare``: ``RewardModel.from_pretrained(RM_DIR).eval()`` in this process (``torch.set_num_threads(threads)``),
  all T texts in one ``score`` call;
- ``bare_chunked``: the same model in chunks of max_batch_size=256 (the forward passes the replica runs;
  the same as ``bare`` when T <= 256);
- ``handle``: straight to the source deployment's handle (``source-rm``), skipping the ingress: chunks of
  256 sent at once and gathered, as the ingress's fan-out does;
- ``serve``: ``RewardClient.score`` through the ingress (validation, fan-out, combination), the call the
  driver makes once per step.

The reward service is started as the driver starts it (``RewardClient.deploy``) with the RL stage's RM source
(``cluster.pipeline.rl_config``: kind=model, max_batch_size=256, max_ongoing_requests=256), HTTP off. Then
handle - bare_chunked = the handle hop (pickling, routing, serve.batch) and serve - handle = the ingress.

    python benchmarks/bench_reward_hop.py --model-path RM_DIR [--texts 512] [--steps 20] [--threads 1]
                                          [--out benchmarks/results/reward_hop]

RM_DIR is a reward-model checkpoint (``RewardModel.save_pretrained``, e.g. ``<run_dir>/rm`` of ``relay
pipeline``). The replica gets num_cpus=0.5 (one torch thread, as in the RL stage) with --threads 1, else
num_cpus=threads (that many torch threads). Prints median and p90 seconds per step of each path and writes
``results.json`` and ``results.md`` to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ray, torch and the reward service are imported in the functions that use them, so that --help is instant.

OUT = Path(__file__).resolve().parent / "results" / "reward_hop"
MAX_BATCH_SIZE = 256
"""as cluster.pipeline.rl_config serves the RM (one forward pass per 256 texts)"""
MAX_ONGOING_REQUESTS = 256
APP_NAME = "bench-reward-hop"
SOURCE = "rm"
PATHS = ("bare", "bare_chunked", "handle", "serve")


def make_requests(n: int) -> list:
    """``n`` addition prompts; the response is the correct answer for the first half, a close miss for the rest."""
    from core.data import AdditionConfig, make_addition
    from reward_service.records import RewardRequest

    rows, _ = make_addition(AdditionConfig(n_train=n, n_eval=1, seed=7))
    out = []
    for i, r in enumerate(rows):
        response = r["answer"] if i < n // 2 else str(int(r["answer"]) + 1 + i % 9)
        out.append(RewardRequest(r["prompt"], response, {"answer": r["answer"]}))
    return out


def chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated ``q``-quantile (0..1) of ``xs``."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


class Paths:
    """The four ways of scoring the same requests; each returns the rewards in request order."""

    def __init__(self, model, client, rm_handle, timeout_s: float):
        self.model, self.client, self.rm_handle, self.timeout_s = model, client, rm_handle, timeout_s

    def bare(self, reqs: list, texts: list[str]) -> list[float]:
        return self.model.score(texts)[0]

    def bare_chunked(self, reqs: list, texts: list[str]) -> list[float]:
        return [v for part in chunks(texts, MAX_BATCH_SIZE) for v in self.model.score(part)[0]]

    def handle(self, reqs: list, texts: list[str]) -> list[float]:
        responses = [self.rm_handle.score.remote(part) for part in chunks(reqs, MAX_BATCH_SIZE)]  # all in flight
        deadline = time.monotonic() + self.timeout_s
        scores = [s for r in responses for s in r.result(timeout_s=max(0.0, deadline - time.monotonic()))]
        errors = [s.error for s in scores if s.error is not None]
        assert not errors, errors[:3]
        return [s.value for s in scores]

    def serve(self, reqs: list, texts: list[str]) -> list[float]:
        results = self.client.score(reqs)  # RewardClient: timeout_s per call
        errors = [r.error for r in results if r.error is not None]
        assert not errors, errors[:3]
        return [r.reward for r in results]


def measure(paths: Paths, reqs: list, steps: int) -> tuple[dict[str, list[float]], float]:
    """Seconds per step of every path (after one warm-up round), the order rotated each step; and the largest
    difference between any path's rewards and ``bare``'s (all run the same model on the same texts)."""
    from reward_service.models import join_text

    texts = [join_text(r.prompt, r.response) for r in reqs]
    reference = paths.bare(reqs, texts)
    max_diff = 0.0
    for name in PATHS:  # warm-up: first handle calls, allocator, serve.batch queues
        got = getattr(paths, name)(reqs, texts)
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(got, reference, strict=True)))
    seconds: dict[str, list[float]] = {name: [] for name in PATHS}
    for step in range(steps):
        k = step % len(PATHS)
        for name in PATHS[k:] + PATHS[:k]:
            start = time.perf_counter()
            getattr(paths, name)(reqs, texts)
            seconds[name].append(time.perf_counter() - start)
        print(f"step {step + 1}/{steps}: " + "  ".join(f"{n}={seconds[n][-1]:.3f}s" for n in PATHS), flush=True)
    return seconds, max_diff


def summarise(seconds: dict[str, list[float]]) -> dict:
    summary = {name: {"median_s": statistics.median(xs), "p90_s": percentile(xs, 0.9), "mean_s": statistics.fmean(xs),
                      "min_s": min(xs)} for name, xs in seconds.items()}
    med = {name: s["median_s"] for name, s in summary.items()}
    base = "bare_chunked"  # the forward passes the replica runs (chunks of max_batch_size)

    def paired(a: str, b: str) -> float:
        """median over steps of a/b measured in the same step"""
        return statistics.median(x / y for x, y in zip(seconds[a], seconds[b], strict=True))

    ratios = {"serve/bare": med["serve"] / med[base], "handle/bare": med["handle"] / med[base],
              "serve/handle": med["serve"] / med["handle"],
              "paired_serve/bare": paired("serve", base), "paired_handle/bare": paired("handle", base)}
    breakdown = {"forward_s": med[base], "handle_hop_s": med["handle"] - med[base],
                 "ingress_s": med["serve"] - med["handle"], "serve_total_s": med["serve"]}
    return {"paths": summary, "ratios": ratios, "breakdown": breakdown}


def markdown(result: dict) -> str:
    a, s = result["args"], result["summary"]
    rows = {"bare": "bare, one call", "bare_chunked": f"bare, chunks of {MAX_BATCH_SIZE}",
            "handle": "source handle (no ingress)", "serve": "RewardClient.score (ingress)"}
    lines = [f"texts={a['texts']} steps={a['steps']} threads={a['threads']} max_batch_size={MAX_BATCH_SIZE} "
             f"model={a['model_path']}", "",
             "| path | median s/step | p90 s/step | / bare |", "|---|---|---|---|"]
    base = s["paths"]["bare_chunked"]["median_s"]
    for name, label in rows.items():
        p = s["paths"][name]
        lines.append(f"| {label} | {p['median_s']:.3f} | {p['p90_s']:.3f} | {p['median_s'] / base:.2f}x |")
    r, b = s["ratios"], s["breakdown"]
    lines += ["", f"serve/bare = {r['serve/bare']:.2f}x, handle/bare = {r['handle/bare']:.2f}x "
                  f"(bare = chunks of {MAX_BATCH_SIZE}; medians; paired per step: {r['paired_serve/bare']:.2f}x, "
                  f"{r['paired_handle/bare']:.2f}x)",
              f"per step: forward {b['forward_s']:.3f} s + handle hop {b['handle_hop_s']:.3f} s + ingress "
              f"{b['ingress_s']:.3f} s = {b['serve_total_s']:.3f} s",
              f"largest reward difference from bare: {result['max_abs_diff']:.2e}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="reward-model checkpoint directory")
    parser.add_argument("--texts", type=int, default=512, help="texts scored per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after one warm-up round)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the bare model and the replica")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="timeout of every remote call, seconds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model_path = str(Path(args.model_path).resolve())

    import ray
    import torch
    from ray import serve

    from reward_service.app import source_deployment_name
    from reward_service.client import RewardClient
    from reward_service.config import RewardConfig, RewardSourceConfig
    from reward_service.models import RewardModel

    torch.set_num_threads(args.threads)
    reqs = make_requests(args.texts)
    start = time.perf_counter()
    model = RewardModel.from_pretrained(model_path).eval()
    load_s = time.perf_counter() - start

    # The RL stage's source; num_cpus=0.5 gives the replica one torch thread (scorers: max(1, round(num_cpus))).
    num_cpus = 0.5 if args.threads == 1 else float(args.threads)
    source = RewardSourceConfig(name=SOURCE, kind="model", model_path=model_path, num_cpus=num_cpus,
                                max_batch_size=MAX_BATCH_SIZE, max_ongoing_requests=MAX_ONGOING_REQUESTS)
    # max_retries=0: a failed call raises instead of hiding a retry inside a step's time
    cfg = RewardConfig(sources=[source], http_enabled=False, timeout_s=args.timeout_s, max_retries=0,
                       deploy_timeout_s=max(300.0, args.timeout_s))
    ray.init(num_cpus=max(2, args.threads + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    client = None
    try:
        start = time.perf_counter()
        client = RewardClient.deploy(cfg, app_name=APP_NAME)
        deploy_s = time.perf_counter() - start
        handle = serve.get_deployment_handle(source_deployment_name(SOURCE), APP_NAME)
        seconds, max_diff = measure(Paths(model, client, handle, args.timeout_s), reqs, args.steps)
        source_stats = client.source_stats()[SOURCE]
    finally:
        try:
            if client is not None:
                client.shutdown()  # as the driver does: delete the app (and stop Serve when it was the last)
        finally:
            serve.shutdown()
            ray.shutdown()

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "args": {"model_path": model_path, "texts": args.texts, "steps": args.steps, "threads": args.threads,
                 "timeout_s": args.timeout_s},
        "source": source.model_dump(mode="json"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "model_load_s": load_s,
        "deploy_s": deploy_s,
        "max_abs_diff": max_diff,
        "summary": summarise(seconds),
        "source_stats": source_stats,
        "seconds": seconds,
    }
    md = markdown(result)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "results.md").write_text(md + "\n")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
