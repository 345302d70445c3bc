"""Learner group on CPU: samples/s and memory per rank for M=1, M=2 ddp and M=2 fsdp; publish seconds by size.

    python benchmarks/learner_group.py [--hidden 512] [--layers 12] [--steps 3] [--prompts 16] [--samples 4]
        [--sizes 256,512,768] [--sweep-layers 4] [--dtype float32] [--out benchmarks/results/learner_group]

A random Qwen2 (about 50M parameters at the defaults: hidden 512, 12 layers, MLP 4x, heads of 64) is built on the
spot and saved to a temporary directory; a local Ray (4 logical CPUs) runs the groups, one at a time, each rank
with one logical CPU and one torch thread. For each configuration (M=1; M=2 ddp; M=2 fsdp) the group takes a
warm-up step and then ``--steps`` timed steps on one fixed batch of hand-made scored rollouts (GRPO, every group
kept, so every sample trains), and reports learner samples/s and, per rank, the bytes of parameters, gradients and
Adam state it holds and its resident memory (max RSS; the growth is max RSS after the steps minus max RSS right
after construction). Then publish (gather to rank 0 + pack + one ``ray.put``) is timed for models of hidden
``--sizes`` x ``--sweep-layers`` layers, M=1 and M=2 fsdp.

On a 2-core machine M=2 cannot be faster than M=1: the samples/s says the plumbing works, not that it scales;
the memory per rank is the point. The script ends with a projection from the measured bytes per parameter to a
7B model on 8 GPUs (``project`` below; parameters, gradients and Adam state only).

Writes ``results.json`` and ``results.md`` under ``--out``. About 5 minutes at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.learner.rollouts: the hand-made scored rollouts

from cluster.config import load_config  # noqa: E402
from learner.bootstrap import build_tiny_model, build_tokenizer  # noqa: E402
from learner.config import TinyModelConfig  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from tests.learner.rollouts import scored_rollouts  # noqa: E402

# (num_workers, strategy); strategy is moot with one rank; "lora" = one rank training LoRA adapters (r 16, all
# linear layers), whose publish merges W + (alpha / r) B A for every adapted weight (gather_seconds)
CONFIGS = [(1, "ddp"), (2, "ddp"), (2, "fsdp"), (1, "lora")]
SWEEP = [(1, "ddp"), (2, "fsdp")]
MB = 1e6

# The projection: a model of PROJECT_PARAMS parameters on PROJECT_RANKS GPUs.
PROJECT_PARAMS = 7e9
PROJECT_RANKS = 8
# Assumed, not measured: bytes per parameter held by this learner with model.dtype=bfloat16. Parameters and
# gradients are bf16 (2 + 2) and torch.optim.AdamW keeps its two moments in the parameter's dtype (2 x 2).
BF16_BYTES_PER_PARAM = 2 + 2 + 2 * 2


def label(workers: int, strategy: str) -> str:
    if strategy == "lora":
        return "M=1 LoRA r=16"
    return "M=1" if workers == 1 else f"M={workers} {strategy}"


def tiny_config(hidden: int, layers: int) -> TinyModelConfig:
    if hidden % 64:
        raise SystemExit(f"--hidden/--sizes {hidden}: must be a multiple of 64 (heads of 64)")
    return TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                           intermediate_size=4 * hidden, max_position_embeddings=64)


def save_model(hidden: int, layers: int, path: Path) -> int:
    """A random Qwen2 of that shape saved at ``path``; returns its parameter count."""
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, tiny_config(hidden, layers))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def start_group(path: Path, workers: int, strategy: str, args) -> LearnerGroup:
    cfg = load_config(None, [
        "algorithm.name=grpo", "algorithm.drop_uniform_groups=false", f"model.dtype={args.dtype}",
        "learner.torch_threads=1", "learner.num_cpus=1", f"learner.num_workers={workers}",
        f"learner.strategy={'ddp' if strategy == 'lora' else strategy}",
        f"learner.micro_batch_tokens={args.micro_batch_tokens}",
        *(["learner.lora.r=16", "learner.lora.alpha=32"] if strategy == "lora" else []),
    ])
    init = (str(path), cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
            cfg.generation.max_tokens)
    return LearnerGroup(cfg.learner, init, {})


def time_publish(group: LearnerGroup, repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` publishes: seconds (gather included), gather seconds, bytes."""
    best = None
    for _ in range(repeats):
        _, refs, stats = group.publish()
        del refs  # let the object store drop the version
        if best is None or stats["sync/publish_seconds"] < best["sync/publish_seconds"]:
            best = stats
    return {"publish_seconds": best["sync/publish_seconds"], "gather_seconds": best["sync/gather_seconds"],
            "bytes": best["sync/bytes"]}


def bench_config(path: Path, workers: int, strategy: str, batch: list, args) -> dict:
    name = label(workers, strategy)
    start = time.perf_counter()
    group = start_group(path, workers, strategy, args)
    try:
        built = group.memory()  # also waits for the constructors (an M=1 group does not)
        build_seconds = time.perf_counter() - start
        group.train_step(batch)  # warm-up
        start = time.perf_counter()
        for _ in range(args.steps):
            group.train_step(batch)
        seconds = time.perf_counter() - start
        after = group.memory()
        publish = time_publish(group, args.publish_repeats)
    finally:
        group.kill()
    ranks = [{"rank": r, "param_bytes": a["param_bytes"], "grad_bytes": a["grad_bytes"],
              "optimizer_bytes": a["optimizer_bytes"], "max_rss_bytes": a["max_rss_bytes"],
              "rss_after_build_bytes": b["max_rss_bytes"], "rss_growth_bytes": a["max_rss_bytes"] - b["max_rss_bytes"]}
             for r, (b, a) in enumerate(zip(built, after, strict=True))]
    out = {"config": name, "workers": workers, "strategy": strategy if workers > 1 or strategy == "lora" else "single",
           "build_seconds": build_seconds, "steps": args.steps, "step_seconds": seconds / args.steps,
           "samples_per_s": args.steps * len(batch) / seconds, "ranks": ranks, **publish}
    print(f"{name}: built in {build_seconds:.1f} s; {out['step_seconds']:.2f} s/step, "
          f"{out['samples_per_s']:.1f} samples/s; publish {publish['publish_seconds']:.3f} s "
          f"(gather {publish['gather_seconds']:.3f} s), {publish['bytes'] / MB:.1f} MB")
    for r in ranks:
        print(f"  rank {r['rank']}: params {r['param_bytes'] / MB:.1f} MB, grads {r['grad_bytes'] / MB:.1f} MB, "
              f"Adam {r['optimizer_bytes'] / MB:.1f} MB; max RSS {r['max_rss_bytes'] / MB:.0f} MB "
              f"(+{r['rss_growth_bytes'] / MB:.0f} MB over the steps)")
    return out


def publish_sweep(tmp: Path, args) -> list[dict]:
    rows = []
    for hidden in args.sizes:
        path = tmp / f"sweep-h{hidden}"
        n_params = save_model(hidden, args.sweep_layers, path)
        for workers, strategy in SWEEP:
            group = start_group(path, workers, strategy, args)
            try:
                publish = time_publish(group, args.publish_repeats)
            finally:
                group.kill()
            row = {"hidden": hidden, "layers": args.sweep_layers, "params": n_params,
                   "config": label(workers, strategy), **publish}
            rows.append(row)
            print(f"hidden {hidden} x {args.sweep_layers} layers ({n_params / 1e6:.1f}M) {row['config']}: publish "
                  f"{publish['publish_seconds']:.3f} s (gather {publish['gather_seconds']:.3f} s), "
                  f"{publish['bytes'] / MB:.1f} MB")
    return rows


def state_bytes(rank: dict) -> float:
    return rank["param_bytes"] + rank["grad_bytes"] + rank["optimizer_bytes"]


def project(bytes_per_param: float, strategy: str) -> float:
    """Per-rank bytes of parameters + gradients + Adam state for PROJECT_PARAMS on PROJECT_RANKS ranks:
    ddp replicates all three on every rank; fsdp shards all three evenly over the ranks."""
    total = PROJECT_PARAMS * bytes_per_param
    return total if strategy == "ddp" else total / PROJECT_RANKS


def projection(configs: list[dict], n_params: int, dtype: str) -> dict:
    single = next(c for c in configs if c["workers"] == 1)
    measured = state_bytes(single["ranks"][0]) / n_params  # bytes per parameter, measured on M=1
    fsdp = next((c for c in configs if c["strategy"] == "fsdp"), None)
    evenness = None  # largest fsdp rank / (M=1 bytes / M): 1.0 = perfectly even shards
    if fsdp is not None:
        evenness = max(state_bytes(r) for r in fsdp["ranks"]) / (state_bytes(single["ranks"][0]) / fsdp["workers"])
    rows = [{"dtype": dtype, "bytes_per_param": measured, "source": "measured here, M=1"}]
    if dtype != "bfloat16":
        rows.append({"dtype": "bfloat16", "bytes_per_param": BF16_BYTES_PER_PARAM,
                     "source": "assumed: bf16 params and grads, AdamW moments in the parameter dtype"})
    for row in rows:
        row["ddp_bytes_per_rank"] = project(row["bytes_per_param"], "ddp")
        row["fsdp_bytes_per_rank"] = project(row["bytes_per_param"], "fsdp")
    return {"params": PROJECT_PARAMS, "ranks": PROJECT_RANKS, "fsdp_evenness_measured": evenness, "rows": rows}


def projection_text(proj: dict) -> list[str]:
    n, m = proj["params"], proj["ranks"]
    lines = [f"Projection to a {n / 1e9:g}B model on {m} GPUs, parameters + gradients + Adam state per rank "
             f"(ddp: {n / 1e9:g}e9 x bytes/param on every rank; fsdp: the same / {m}):"]
    for row in proj["rows"]:
        lines.append(f"- {row['dtype']}, {row['bytes_per_param']:.2f} bytes/param ({row['source']}): "
                     f"ddp {row['ddp_bytes_per_rank'] / 1e9:.1f} GB per rank, "
                     f"fsdp {row['fsdp_bytes_per_rank'] / 1e9:.1f} GB per rank")
    if proj["fsdp_evenness_measured"] is not None:
        lines.append(f"- measured here: the largest fsdp rank holds {proj['fsdp_evenness_measured']:.3f} x an even "
                     f"share; the projection assumes even shards.")
    lines.append("- not included (assumed, not measured): activations and their checkpoints, the logits of a "
                 "micro-batch, the fsdp all-gather buffers (one or two whole layers at a time), a frozen reference "
                 "(kl_in != none: its parameters again, no grads or Adam state) or a PPO critic (all three again), "
                 "CUDA context and allocator fragmentation. The RSS measured here on CPU also counts the Python, "
                 "torch and Ray runtime of each rank process.")
    return lines


def mb(x: float) -> str:
    return f"{x / MB:.1f}"


def markdown(setup: dict, configs: list[dict], sweep: list[dict], proj: dict) -> str:
    lines = [
        f"Learner group on CPU ({setup['cpus']} cores; gloo), random Qwen2 hidden {setup['hidden']} x "
        f"{setup['layers']} layers ({setup['params'] / 1e6:.1f}M params, {setup['dtype']}), GRPO, "
        f"{setup['batch']} samples per step ({setup['prompts']} prompts x {setup['samples']}), "
        f"{setup['steps']} timed step(s) after one warm-up; each rank 1 logical CPU, 1 torch thread.",
        "",
        "On this machine M=2 cannot be faster than M=1 (the ranks share its cores): samples/s shows the plumbing "
        "works; the memory per rank is the point.",
        "",
        "| config | rank | samples/s | s/step | params MB | grads MB | Adam MB | max RSS MB | RSS growth MB "
        "| publish s | gather s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        for r in c["ranks"]:
            first = r["rank"] == 0
            lines.append(
                f"| {c['config']} | {r['rank']} | {c['samples_per_s']:.1f} | {c['step_seconds']:.2f} | "
                f"{mb(r['param_bytes'])} | {mb(r['grad_bytes'])} | {mb(r['optimizer_bytes'])} | "
                f"{r['max_rss_bytes'] / MB:.0f} | {r['rss_growth_bytes'] / MB:.0f} | "
                + (f"{c['publish_seconds']:.3f} | {c['gather_seconds']:.3f} |" if first else "| |"))
    lines += ["", "Publish (gather to rank 0, pack, one `ray.put`; fastest of "
              f"{setup['publish_repeats']}) against model size:", "",
              "| hidden | layers | params (M) | config | publish s | gather s | MB |", "|---|---|---|---|---|---|---|"]
    for row in sweep:
        lines.append(f"| {row['hidden']} | {row['layers']} | {row['params'] / 1e6:.1f} | {row['config']} | "
                     f"{row['publish_seconds']:.3f} | {row['gather_seconds']:.3f} | {mb(row['bytes'])} |")
    return "\n".join([*lines, "", *projection_text(proj)]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512, help="width of the benchmarked model (heads of 64)")
    parser.add_argument("--layers", type=int, default=12, help="layers of the benchmarked model")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps per configuration")
    parser.add_argument("--prompts", type=int, default=16, help="groups in the batch")
    parser.add_argument("--samples", type=int, default=4, help="samples per group")
    parser.add_argument("--micro-batch-tokens", type=int, default=32768, help="learner.micro_batch_tokens")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model.dtype")
    parser.add_argument("--sizes", default="256,512,768", help="hidden sizes of the publish sweep")
    parser.add_argument("--sweep-layers", type=int, default=4, help="layers of the publish sweep's models")
    parser.add_argument("--publish-repeats", type=int, default=2, help="publishes per group (the fastest counts)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "learner_group"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    batch = scored_rollouts(n_prompts=args.prompts, samples=args.samples, seed=0)
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            tmp = Path(tmp)
            n_params = save_model(args.hidden, args.layers, tmp / "policy")
            print(f"model: random Qwen2, hidden {args.hidden} x {args.layers} layers, {n_params / 1e6:.1f}M params, "
                  f"{args.dtype}; batch {len(batch)} samples ({args.prompts} prompts x {args.samples})")
            print("note: on 2 cores M=2 cannot be faster than M=1; samples/s checks the plumbing, the memory per "
                  "rank is the point")
            configs = [bench_config(tmp / "policy", w, s, batch, args) for w, s in CONFIGS]
            sweep = publish_sweep(tmp, args)
    finally:
        ray.shutdown()

    proj = projection(configs, n_params, args.dtype)
    for line in projection_text(proj):
        print(line)
    setup = {"hidden": args.hidden, "layers": args.layers, "params": n_params, "dtype": args.dtype,
             "steps": args.steps, "prompts": args.prompts, "samples": args.samples, "batch": len(batch),
             "micro_batch_tokens": args.micro_batch_tokens, "publish_repeats": args.publish_repeats,
             "cpus": _cores(), "torch_threads_per_rank": 1, "num_cpus_per_rank": 1,
             "seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(
        {"setup": setup, "configs": configs, "publish": sweep, "projection": proj}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(setup, configs, sweep, proj))
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({setup['seconds']:.0f} s in all)")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


if __name__ == "__main__":
    main()
