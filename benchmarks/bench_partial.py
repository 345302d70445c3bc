"""Where partial rollouts' generation time goes: segments against one request, by KV-cache block size.

A partial rollout samples in segments (``generation.partial_segment_tokens``); each segment is a new engine
request over the sample's prefix (prompt + the tokens so far), and prefix caching reuses whole KV blocks only.
Two Relay generation actors run in this process (no Ray), one with vLLM's CPU block of 128 tokens, one with 32
(the smallest CPU attention takes, Relay's default with partial rollouts on CPU), one thread each on one core.
Every round samples one batch with each mode on each engine, in an order that alternates round by round:

- ``one request``: partial rollouts off;
- ``segments of S``: partial rollouts with S-token segments, no weight swap (what the prefix cache saves);
- ``segments of 16, reset each``: the prefix cache reset before every segment, as a weight swap between every
  two segments would (the recompute new weights need).

The batch: the tiny model after one SFT step (its responses run long), ``generation.max_tokens`` 128 and 16
prompts x 8 samples, the setting of the README's partial-rollout loop runs.

    python benchmarks/bench_partial.py [--rounds 5] [--out benchmarks/results/partial]

Prints each mode's median seconds a batch, and its time per sampled token against one request's on the same
engine (the modes sample different lengths: no seeds, which partial rollouts do not take), and writes
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
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engines in this process, as bench_loop.py runs them

OUT = Path(__file__).resolve().parent / "results" / "partial"
OVERRIDES = ["model.tiny.max_position_embeddings=256", "sft.steps=1", "generation.max_tokens=128",
             "generation.min_tokens=0", "generation.max_model_len=192", "train.prompts_per_step=16",
             "generation.num_actors=1", "generation.torch_threads=1", "algorithm.max_staleness=1"]
BLOCKS = (128, 32)
MODES = {  # name: (partial rollouts, segment tokens, reset the prefix cache before every segment)
    "one request": (False, 16, False),
    "segments of 16": (True, 16, False),
    "segments of 32": (True, 32, False),
    "segments of 64": (True, 64, False),
    "segments of 16, reset each": (True, 16, True),
}


def engines(cfg, path: str) -> dict:
    """One Relay generation actor per block size, each reading ``cfg.generation`` (the modes change it)."""
    from actors.generation import GenerationActor

    out = {}
    for block in BLOCKS:
        cfg.generation.block_size = block
        actor = GenerationActor(cfg.generation.model_copy(), path, cfg.model.dtype)
        actor.cfg = cfg.generation  # shared: a mode set once applies to both
        swap = actor._swap_staged

        def swap_and_reset(actor=actor, swap=swap):
            if actor.reset_each:
                actor.llm.reset_prefix_cache()
            swap()

        actor.reset_each, actor._swap_staged = False, swap_and_reset
        out[block] = actor
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    from cluster.config import load_config
    from cluster.driver import encode_data, resolve_policy
    from core.data import load_splits

    cfg = load_config(overrides=[*OVERRIDES, "model.cache_dir=.relay_cache"])
    path = resolve_policy(cfg, log=lambda *_: None)
    data = encode_data(cfg, load_splits(cfg.data, cfg.model.cache_dir, log=lambda *_: None), log=lambda *_: None)
    actors = engines(cfg, path)
    g, per = cfg.generation, cfg.train.prompts_per_step
    runs = [(block, mode) for block in BLOCKS for mode in MODES]
    batches = [data.train[i * per:(i + 1) * per] for i in range(args.rounds + 1)]
    for actor in actors.values():
        actor.generate(batches[0])  # warm-up
    seconds: dict[tuple[int, str], list[float]] = {run: [] for run in runs}
    tokens: dict[tuple[int, str], int] = {run: 0 for run in runs}
    for r, batch in enumerate(batches[1:]):
        for block, mode in runs if r % 2 == 0 else runs[::-1]:
            g.partial_rollouts, g.partial_segment_tokens, actors[block].reset_each = MODES[mode]
            start = time.perf_counter()
            rollouts = actors[block].generate(batch).rollouts
            seconds[block, mode].append(time.perf_counter() - start)
            tokens[block, mode] += sum(len(x.response_ids) for x in rollouts)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for block, mode in runs:
        per_token = sum(seconds[block, mode]) / tokens[block, mode]
        baseline = sum(seconds[block, "one request"]) / tokens[block, "one request"]
        rows.append({"block_size": block, "mode": mode,
                     "median_seconds": round(statistics.median(seconds[block, mode]), 4),
                     "mean_tokens": round(tokens[block, mode] / len(seconds[block, mode])),
                     "tokens_per_second": round(1 / per_token), "time_per_token_ratio": round(per_token / baseline, 3)})
    lines = ["| mode (16 prompts x 8, up to 128 tokens) | block | median s | tokens a batch | tokens/s | time a token, "
             "x one request |", "|---|---|---|---|---|---|"]
    lines += [f"| {x['mode']} | {x['block_size']} | {x['median_seconds']:.3f} | {x['mean_tokens']} | "
              f"{x['tokens_per_second']} | {x['time_per_token_ratio']:.2f}x |" for x in rows]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rounds": args.rounds,
            "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
