"""Relay against TRL's ``GRPOTrainer``: the same model, data, batch and learning rate, run one after the other.

    PYTHONPATH=/path/to/trl python benchmarks/bench_trl.py [--seconds 600] [--heavy-seconds 240]

TRL is not a Relay dependency. Install it beside the venv without touching its packages, e.g.
``pip install --target /work/trl_pkgs --no-deps trl`` (its dependencies, transformers, accelerate and
datasets, are Relay's too), and pass ``--trl-path /work/trl_pkgs``.

Three configurations, TRL first, then Relay, each in its own process with the machine to itself:

- default: the embedded task and model (tiny Qwen2, 64 prompts x 8 samples a step, 6-token responses,
  lr 1e-4 with 50 warm-up steps, clip 0.2, no KL, group-normalised advantages, token-mean loss). TRL
  keeps its own defaults of bf16 autocast and gradient checkpointing unless ``--trl-fp32`` (Relay's learner
  trains in float32); it generates with Hugging Face ``generate``; Relay with its vLLM actors in the default
  on-policy loop (two single-thread engines, one per core; ``default-1x2``: one 2-thread engine). Each
  trains ``--seconds``. Relay evaluates in its loop (counted in its wall time); TRL's weights are
  snapshotted every ``--snapshot-every`` seconds (the copy's time is not counted) and evaluated afterwards
  on the same 500 held-out prompts, greedy, with Hugging Face ``generate``.
- streaming: the same task, Relay's streaming loop (``algorithm.max_staleness=1``, one engine with one
  thread and a one-thread learner), against the same TRL run (``--reuse-trl`` takes a stored one).
- heavy: a generation-heavy configuration, a 25M-parameter model (hidden 512, 6 layers) and 128-token
  responses (both sides forbid end-of-sequence before 128 tokens), 16 prompts x 8 samples a step,
  ``--heavy-seconds`` each, steps per second only. No response is correct at that length, so Relay is told
  to train on uniform groups as TRL does (its default skips them).

``--trl-micro-batch N`` adds a TRL run that splits each step's batch into passes of N completions (gradient
accumulation; one optimiser step and one generation a step, as before), stored beside the run that does the
whole batch in one pass.

Reported: steps per second (the median step after warm-up, and steps over the run) as Relay / TRL, and the
wall time each needs to first reach TRL's held-out score after ``--seconds`` (mean of its last three
snapshots) as TRL / Relay. Writes ``benchmarks/results/trl/results.json``, ``results.md`` and
``learning.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_loop import eval_curve, machine, plot_learning, relay_train

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "trl"
HEAVY = ["model.tiny.hidden_size=512", "model.tiny.num_layers=6", "model.tiny.num_heads=8",
         "model.tiny.intermediate_size=2048", "model.tiny.max_position_embeddings=256", "sft.steps=60",
         "generation.max_tokens=128", "generation.min_tokens=128", "generation.max_model_len=192",
         "train.prompts_per_step=16"]
STREAMING = ["algorithm.max_staleness=1", "generation.num_actors=1", "learner.torch_threads=1"]
HEAVY_BF16 = ["algorithm.drop_uniform_groups=false", "learner.mixed_precision=bf16"]  # Relay's loop, heavy-bf16*
HEAVY_ENGINE = HEAVY_BF16 + ["model.dtype=bfloat16"]  # and vLLM in bfloat16 (heavy-bf16-engine and after)
HEAVY_COMPILED = HEAVY_ENGINE + ["generation.enforce_eager=false"]
CONFIGS = {  # name: (the task and model, for both; Relay's loop settings)
    "default": ([], []),  # on-policy, two single-thread engines (one per core) and a 2-thread learner
    "default-1x2": ([], ["generation.num_actors=1", "generation.torch_threads=2"]),  # the default before 12-06 (4th)
    "streaming": ([], STREAMING),  # the default task, Relay's streaming loop with 1 + 1 threads
    # Every 128-token response scores 0, so every group is uniform: Relay would skip the update (its default
    # drops such groups), TRL does it with zero advantages. Relay does it too here, so both do the same work.
    "heavy": (HEAVY, ["algorithm.drop_uniform_groups=false"]),
    # Relay's learner in mixed precision as TRL's defaults run (bf16 autocast, float32 weights); "-engine" also
    # runs vLLM in bfloat16 (the learner publishes its float32 weights cast to it)
    "default-bf16": ([], ["learner.mixed_precision=bf16"]),
    "streaming-bf16": ([], STREAMING + ["learner.mixed_precision=bf16"]),
    "heavy-bf16": (HEAVY, HEAVY_BF16),
    "heavy-bf16-engine": (HEAVY, HEAVY_ENGINE),
    # and vLLM runs its model compiled by torch.compile (generation.enforce_eager=false, as cluster/gpu.yaml sets):
    # about 30 s at an engine's first start here, vLLM's compile cache after that
    "heavy-bf16-compiled": (HEAVY, HEAVY_COMPILED),
    "heavy-bf16-compiled-1x2": (HEAVY, HEAVY_COMPILED + ["generation.num_actors=1", "generation.torch_threads=2"]),
    # the learner's decoder layers compiled (learner.compile), the engines eager as in heavy-bf16-engine
    "heavy-bf16-learner-compiled": (HEAVY, HEAVY_ENGINE + ["learner.compile=true"]),
}


def trl_run(overrides: list[str], seconds: float, snapshot_every: float | None, fp32: bool = False,
            micro_batch: int | None = None) -> dict:
    """TRL's ``GRPOTrainer`` on Relay's model, prompts and reward for ``seconds`` (run in a fresh process).
    ``fp32``: turn off two of GRPOConfig's defaults, bf16 autocast and gradient checkpointing (Relay's learner
    trains in float32 without checkpointing). ``micro_batch``: completions per forward/backward, the step's
    batch accumulated over several (one optimizer step and one generation a step, as without it); None = the
    whole batch in one pass."""
    import torch

    torch.set_num_threads(2)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from cluster.config import load_config
    from cluster.driver import encode_data, resolve_policy
    from core.data import exact_match, load_splits

    cfg = load_config(overrides=overrides)
    path = resolve_policy(cfg, log=lambda *_: None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = encode_data(cfg, load_splits(cfg.data, cfg.model.cache_dir, log=lambda *_: None), tokenizer,
                       log=lambda *_: None)
    assert tokenizer(text=[data.train[0].text])["input_ids"][0] == data.train[0].token_ids, "TRL tokenises differently"
    g = cfg.generation
    per_step = cfg.train.prompts_per_step * g.samples_per_prompt
    micro_batch = micro_batch or per_step
    assert per_step % micro_batch == 0, f"--trl-micro-batch must divide the step's {per_step} completions"
    train = Dataset.from_list([{"prompt": p.text, "answer": p.metadata["answer"]} for p in data.train])

    def reward(completions: list[str], answer: list[str], **_) -> list[float]:
        return [float(exact_match(c, a)) for c, a in zip(completions, answer, strict=True)]

    args = _grpo_config(cfg, per_step, micro_batch, fp32)
    clock = _trl_clock(seconds, snapshot_every)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=train,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    steps = len(clock.ends)
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    out = {"steps": steps, "seconds": clock.ends[-1], "step_s": statistics.median(step_s[warmup(steps):]),
           "response_tokens": statistics.mean(clock.lengths) if clock.lengths else None}
    if snapshot_every:
        out["curve"] = score_snapshots(path, tokenizer, next(iter(data.eval_sets.values())), g.max_tokens,
                                       clock.snaps)
    return out


def _trl_clock(seconds: float, snapshot_every: float | None):
    """A TrainerCallback that records step end times, takes weight snapshots every ``snapshot_every`` s of
    training (their copy time is not counted) and stops the run after ``seconds``."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = self.last = 0.0  # last: training seconds at the last snapshot
            self.paused, self.ends, self.snaps, self.lengths = 0.0, [], [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kw):
            now = time.perf_counter()
            elapsed = now - self.t0 - self.paused
            self.ends.append(elapsed)
            if snapshot_every and elapsed - self.last >= snapshot_every:
                self.snaps.append((state.global_step, elapsed, {k: v.detach().clone()
                                                                for k, v in model.state_dict().items()}))
                self.last = elapsed
                self.paused += time.perf_counter() - now
            if elapsed >= seconds:
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                self.lengths.append(float(logs["completions/mean_length"]))

    return Clock()


def _grpo_config(cfg, per_step: int, micro_batch: int, fp32: bool):
    """TRL's GRPOConfig for Relay's task, batch, sampling and optimiser settings (see ``trl_run``)."""
    from trl import GRPOConfig

    g, lc, algo = cfg.generation, cfg.learner, cfg.algorithm
    return GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="relay-bench-trl-"), use_cpu=True, seed=cfg.train.seed,
        per_device_train_batch_size=micro_batch, gradient_accumulation_steps=per_step // micro_batch,
        steps_per_generation=per_step // micro_batch,
        num_generations=g.samples_per_prompt, max_completion_length=g.max_tokens, temperature=g.temperature,
        top_p=g.top_p, generation_kwargs={"min_new_tokens": g.min_tokens} if g.min_tokens else None,
        learning_rate=lc.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=lc.warmup_steps,
        weight_decay=lc.weight_decay, max_grad_norm=lc.max_grad_norm, num_iterations=lc.epochs,
        beta=0.0, epsilon=algo.clip_low, epsilon_high=algo.clip_high, loss_type="dapo", scale_rewards="group",
        max_steps=10**6, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
        bf16=not fp32, gradient_checkpointing=not fp32)


def score_snapshots(path: str, tokenizer, eval_set: list, max_tokens: int, snaps: list) -> list:
    """(step, training seconds, held-out greedy exact-match score) of the start and of each weight snapshot."""
    import torch
    from transformers import AutoModelForCausalLM

    from core.data import exact_match
    from learner.sft import greedy_responses

    prompts, answers = [p.text for p in eval_set], [p.metadata["answer"] for p in eval_set]
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()

    def score() -> float:
        texts = greedy_responses(model, tokenizer, prompts, max_tokens)
        return sum(exact_match(t, a) for t, a in zip(texts, answers, strict=True)) / len(answers)

    curve = [(0, 0.0, score())]
    for step, elapsed, state in snaps:
        model.load_state_dict(state)
        curve.append((step, elapsed, score()))
    return curve


def warmup(steps: int) -> int:
    """Steps left out of the median step time: 10, or a fifth of a short run."""
    return min(10, steps // 5)


def relay_run(name: str, overrides: list[str], seconds: float, evaluate: bool) -> dict:
    """A ``relay train`` of ``seconds``: the default evaluations (held-out score against wall time), or none."""
    run_dir = Path("/tmp/relay-bench-trl") / name
    rows = relay_train(run_dir, seconds, overrides, evaluate)
    t0 = rows[0]["time"]
    steps = sorted((r["step"], r["time"] - t0, r["system/step_seconds"]) for r in rows if "system/step_seconds" in r)
    lengths = [r["rollout/response_length_mean_tokens"] for r in rows if "rollout/response_length_mean_tokens" in r]
    out = {"steps": len(steps), "seconds": steps[-1][1],
           "step_s": statistics.median(s for _, _, s in steps[warmup(len(steps)):]),
           "summary": json.loads((run_dir / "summary.json").read_text()),
           "response_tokens": statistics.mean(lengths) if lengths else None}
    if evaluate:
        out["curve"] = eval_curve(rows)
    return out


def first_reaching(curve: list, target: float) -> float | None:
    """Seconds at which ``curve`` (step, seconds, score) first reaches ``target``."""
    return next((t for _, t, s in curve if s >= target - 1e-9), None)


def compare(results: dict) -> None:
    """Ratios of one configuration's two runs (filled into ``results``)."""
    trl, relay = results["trl"], results["relay"]
    results["steps_per_s_ratio"] = trl["step_s"] / relay["step_s"]
    results["run_steps_ratio"] = (relay["steps"] / relay["seconds"]) / (trl["steps"] / trl["seconds"])
    if "curve" in trl and "curve" in relay:
        target = statistics.mean(s for _, _, s in trl["curve"][-3:])
        results["target"] = target
        results["trl_reach_s"], results["relay_reach_s"] = (first_reaching(trl["curve"], target),
                                                            first_reaching(relay["curve"], target))
        if results["relay_reach_s"]:
            results["reach_ratio"] = results["trl_reach_s"] / results["relay_reach_s"]


def table(all_results: dict) -> str:
    lines = ["| configuration | TRL median step | Relay median step | Relay / TRL steps per s (median; whole run) "
             "| TRL score (last three) | TRL reaches it | Relay reaches it | TRL / Relay time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in all_results["configs"].items():
        fmt = lambda v: "never" if v is None else f"{v:.0f} s"  # noqa: E731
        ratio = f"**{r['reach_ratio']:.2f}x**" if "reach_ratio" in r else ""
        reach = ("| | | |" if "target" not in r else
                 f"| {r['target']:.3f} | {fmt(r['trl_reach_s'])} | {fmt(r['relay_reach_s'])} | {ratio} |")
        trl, relay = r["trl"], r["relay"]
        lines.append(f"| {name} | {trl['step_s']:.3f} s ({trl['steps']} steps) | {relay['step_s']:.3f} s "
                     f"({relay['steps']} steps) | **{r['steps_per_s_ratio']:.2f}x**; {r['run_steps_ratio']:.2f}x "
                     + reach)
        for micro in (k for k in r if k.startswith("trl_micro")):
            n = micro.removeprefix("trl_micro")
            lines.append(f"| {name}, TRL {n} completions a pass | {r[micro]['step_s']:.3f} s ({r[micro]['steps']} "
                         f"steps) | | **{r[f'steps_per_s_ratio_{micro}']:.2f}x** | | | | |")
    return "\n".join(lines)


def plot(configs: dict, path: Path) -> None:
    """Held-out score against training seconds: TRL and each Relay loop on the default task."""
    curves = {f"Relay, {name}": (c["relay"]["curve"], c["relay"]["steps"]) for name, c in configs.items()
              if "curve" in c["relay"]}
    trl = [c["trl"] for c in configs.values() if "curve" in c["trl"]]
    if trl:
        curves["TRL GRPOTrainer"] = (trl[0]["curve"], trl[0]["steps"])
    if curves:
        plot_learning(curves, path, "seconds of training")


def trl_subprocess(spec: dict, env: dict) -> dict:
    """``trl_run(**spec)`` in a fresh process (its torch threads and memory are its own)."""
    run = subprocess.run([sys.executable, __file__, "--trl-only", json.dumps(spec)], cwd=ROOT, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--heavy-seconds", type=float, default=240.0)
    p.add_argument("--snapshot-every", type=float, default=30.0)
    p.add_argument("--relay-eval-every", type=int, help="Relay's held-out evaluation every this many steps "
                   "(train.eval_every; default: Relay's own; 50 is about TRL's 30 s snapshots at Relay's step times)")
    p.add_argument("--configs", default="default,streaming,heavy", help=f"comma-separated, of {list(CONFIGS)}")
    p.add_argument("--reuse-trl", action="store_true", help="compare with the newest TRL run stored in results.json "
                   "for the same task instead of running TRL again")
    p.add_argument("--trl-from", help="compare with the TRL run stored under this configuration (e.g. default, "
                   "measured in the same session); --reuse-trl alone takes the newest stored run of each task")
    p.add_argument("--trl-fp32", action="store_true", help="TRL without its bf16 autocast and gradient "
                   "checkpointing defaults (the stored runs used the defaults)")
    p.add_argument("--trl-micro-batch", type=int, help="TRL's completions per forward/backward (its "
                   "per_device_train_batch_size, gradient accumulation over the step's batch); stored beside the run "
                   "with its whole batch in one pass, as trl_micro<N>")
    p.add_argument("--trl-path", default=os.environ.get("TRL_PATH"), help="a directory holding trl (pip --target)")
    p.add_argument("--trl-only", help=argparse.SUPPRESS)  # internal: one TRL run (JSON args), JSON out
    args = p.parse_args()
    if args.trl_only:
        print(json.dumps(trl_run(**json.loads(args.trl_only))))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"configs": {}}
    results.update(machine=machine(), date=time.strftime("%Y-%m-%d"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), args.trl_path,
                                                                   os.environ.get("PYTHONPATH")])))
    newest_last = sorted(results["configs"].values(), key=lambda c: c.get("date", ""))  # rows before dates first
    trl_runs = {json.dumps(c["overrides"]): c["trl"] for c in newest_last} if args.reuse_trl else {}
    if args.trl_from:  # one stored configuration's TRL run, for every configuration of the same task
        stored = results["configs"][args.trl_from]
        trl_runs[json.dumps(stored["overrides"])] = stored["trl"]
    for name in args.configs.split(","):
        overrides, loop = CONFIGS[name]
        evaluate = not overrides  # the default task: held-out score against time
        seconds = args.seconds if evaluate else args.heavy_seconds
        key = json.dumps(overrides)
        spec = {"overrides": overrides, "seconds": seconds, "fp32": args.trl_fp32,
                "snapshot_every": args.snapshot_every if evaluate else None}
        if key not in trl_runs:
            trl_runs[key] = trl_subprocess(spec, env)
            print(f"{name}, TRL: {trl_runs[key]['steps']} steps, median {trl_runs[key]['step_s']:.3f} s", flush=True)
        if evaluate and args.relay_eval_every:  # stored apart from runs at Relay's own cadence
            loop, name = [*loop, f"train.eval_every={args.relay_eval_every}"], f"{name}-eval{args.relay_eval_every}"
        r = {"overrides": overrides, "relay_overrides": loop, "trl": trl_runs[key], "date": time.strftime("%Y-%m-%d"),
             "relay": relay_run(name, overrides + loop, seconds, evaluate=evaluate)}
        print(f"{name}, Relay: {r['relay']['steps']} steps, median {r['relay']['step_s']:.3f} s", flush=True)
        if args.trl_micro_batch:
            micro = f"trl_micro{args.trl_micro_batch}"
            r[micro] = trl_subprocess({**spec, "micro_batch": args.trl_micro_batch}, env)
            r[f"steps_per_s_ratio_{micro}"] = r[micro]["step_s"] / r["relay"]["step_s"]
            print(f"{name}, TRL with {args.trl_micro_batch} completions a pass: {r[micro]['steps']} steps, median "
                  f"{r[micro]['step_s']:.3f} s", flush=True)
        compare(r)
        results["configs"][name] = r
        path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results["configs"], OUT / "learning.png")
    md = table(results)
    (OUT / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
