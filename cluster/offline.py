"""``relay dpo`` and ``relay rwr``: offline training on the learner group.

``relay dpo`` is preference optimisation (DPO, IPO, conservative DPO); ``relay rwr`` is reward-weighted
regression (Peters & Schaal 2007) from ``(prompt, response, reward)`` records, the same loop without a
reference. For DPO:

1. Pairs: ``dpo.preferences_path`` through the data layer, or built from the start policy's own samples on
   the training prompts, judged by the reward (``learner/preferences.py``; timed and logged apart). Held-out
   pairs come from ``dpo.eval_preferences_path`` or from a share of the prompts. Both are kept in the run
   directory (``pairs/``), so a resumed run trains on the same ones.
2. The reference's log-probs of every pair are computed once by the learner before its first update (the
   start policy is the reference) and cached with the run (``reference_logprobs.json``): no reference model
   is held during training (TRL's ``precompute_ref_log_probs``).
3. Steps of ``dpo.batch_size`` pairs in a shuffled order, epoch after epoch, until ``dpo.steps`` or
   ``dpo.time_limit_s``. Every ``dpo.eval_every`` steps: held-out pair loss, implicit rewards, margin and
   preference accuracy, and the held-out greedy score of the policy (the configured reward, as ``relay
   train`` reports it). Metrics go to ``metrics.jsonl`` and Prometheus (``offline/*``, ``eval/task_score``).
4. Checkpoints as ``relay train`` writes them (Hugging Face policy, optimizer, order and position), every
   ``checkpoint.every_s``/``every`` and at the end; ``relay dpo --resume`` continues from the last one.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

from cluster import checkpoint
from cluster.config import RelayConfig
from cluster.driver import RunError, encode_data, resolve_policy

PAIRS_DIR = "pairs"
REFERENCE_FILE = "reference_logprobs.json"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def scored_samples(cfg: RelayConfig, policy: str, data, k: int, seed: int) -> tuple[list, list, list, list]:
    """The start policy's ``k`` samples per training prompt (transformers, the generation temperature) and their
    rewards from ``reward.sources`` scored in this process: (prompts, metadatas, samples[i][k], scores[i][k])."""
    from transformers import AutoModelForCausalLM

    from cluster.evaluation import local_score
    from learner.sft import sample_responses

    model = AutoModelForCausalLM.from_pretrained(policy)
    prompts = [p.text for p in data.train]
    metadatas = [p.metadata for p in data.train]
    samples = sample_responses(model, data.tokenizer, prompts, k, cfg.generation.max_tokens,
                               cfg.generation.temperature, seed=seed)
    flat = local_score(cfg.reward.sources)([p for p in prompts for _ in range(k)], [s for ss in samples for s in ss],
                                           [m for m in metadatas for _ in range(k)])
    return prompts, metadatas, samples, [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


def build_pairs(cfg: RelayConfig, policy: str, data, log: Callable[[str], object]) -> tuple[list[dict], list[dict]]:
    """(train, held-out) preference records: from the files, or from the policy's samples on training prompts."""
    from core.data import SourceConfig, read_rows
    from learner.preferences import pairs_from_samples, split_pairs_by_prompt

    d = cfg.dpo
    if d.preferences_path:
        rows = read_rows(SourceConfig(path=d.preferences_path), cfg.data.on_invalid, log=log)
        if d.eval_preferences_path:
            return rows, read_rows(SourceConfig(path=d.eval_preferences_path), cfg.data.on_invalid, log=log)
        return split_pairs_by_prompt(rows, d.eval_fraction, d.seed)
    started = time.perf_counter()
    prompts, metadatas, samples, scores = scored_samples(cfg, policy, data, d.policy_samples, d.seed)
    rows = pairs_from_samples(prompts, metadatas, samples, scores, d.seed)
    log(f"built {len(rows)} pairs from {d.policy_samples} samples x {len(prompts)} training prompts "
        f"in {time.perf_counter() - started:.1f} s")
    if not rows:
        raise RunError("no preference pair could be built: every prompt's samples scored the same; give "
                       "dpo.preferences_path or raise dpo.policy_samples")
    return split_pairs_by_prompt(rows, d.eval_fraction, d.seed)


class DPORun:
    """The loop of ``relay dpo`` around a learner group; ``run()`` returns the summary. ``RWRRun`` below changes
    the records, the step and the evaluation."""

    kind = "dpo"

    def __init__(self, cfg: RelayConfig, log: Callable[[str], object] = print, resume_from: Path | None = None):
        self.cfg, self.log, self.resume_from = cfg, log, resume_from
        self.run_dir = Path(cfg.train.run_dir)
        self.step, self.cursor, self.order, self.evals, self.elapsed_before = 0, 0, [], [], 0.0
        self.timings: dict[str, float] = {}
        self.last_checkpoint: Path | None = resume_from
        self.logger = None  # the metrics log, open while run() runs
        self._score = None  # the held-out reward, built at the first evaluation
        self.metrics_offset: int | None = None

    @property
    def section(self):
        return self.cfg.dpo

    # ---- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        from core.data import load_splits

        cfg = self.cfg
        self.policy = resolve_policy(cfg, log=self.log)
        splits = load_splits(cfg.data, cfg.model.cache_dir, log=self.log)
        self.data = encode_data(cfg, splits, log=self.log)
        self._records()

    def _records(self) -> None:
        from learner.preferences import encode_pairs

        cfg = self.cfg
        pairs_dir = self.run_dir / PAIRS_DIR
        started = time.perf_counter()
        if (pairs_dir / "train.jsonl").is_file() and (pairs_dir / "eval.jsonl").is_file():
            train_rows = [json.loads(x) for x in (pairs_dir / "train.jsonl").read_text().splitlines()]
            eval_rows = [json.loads(x) for x in (pairs_dir / "eval.jsonl").read_text().splitlines()]
        else:
            train_rows, eval_rows = build_pairs(cfg, self.policy, self.data, self.log)
            _write_jsonl(pairs_dir / "train.jsonl", train_rows)
            _write_jsonl(pairs_dir / "eval.jsonl", eval_rows)
        self.timings["pairs_seconds"] = time.perf_counter() - started
        context = cfg.generation.max_model_len
        tok, on_invalid = self.data.tokenizer, cfg.data.on_invalid
        self.pairs = encode_pairs(train_rows, tok, context, on_invalid, where="preference pairs", log=self.log)
        self.eval_pairs = encode_pairs(eval_rows, tok, context, on_invalid, where="held-out pairs",
                                       log=self.log)[: cfg.dpo.eval_pairs]
        self.log(f"{len(self.pairs)} training pairs, {len(self.eval_pairs)} held-out pairs")

    def start(self) -> None:
        from learner.config import AlgorithmConfig
        from learner.group import LearnerGroup

        cfg, lc = self.cfg, self.cfg.learner
        state = checkpoint.read_state(self.resume_from) if self.resume_from else None
        start_path = str(self.resume_from) if state else self.policy
        # temperature 1: log-probs of the policy itself; no KL term, so no reference model is loaded
        args = (start_path, AlgorithmConfig(), lc, cfg.model.dtype, 1.0, cfg.generation.max_tokens)
        self.learner = LearnerGroup(lc, args, {"reference_path": self.policy, "seed": self.section.seed},
                                    start_timeout_s=cfg.generation.start_timeout_s)
        self.reference = self._reference() if self.kind == "dpo" else None
        if state:
            self.learner.load_state(start_path)
            self.step, self.cursor, self.order = state["step"], state["cursor"], state["order"]
            self.evals, self.elapsed_before = state["evals"], state["elapsed"]
            self.metrics_offset = state.get("metrics_offset")

    def _reference(self) -> dict[str, list]:
        """Reference log-probs of every pair, from the cache or computed now by the untrained policy."""
        path = self.run_dir / REFERENCE_FILE
        digest = hashlib.sha256(repr([(p.prompt_ids, p.chosen_ids, p.rejected_ids)
                                      for p in [*self.pairs, *self.eval_pairs]]).encode()).hexdigest()[:16]
        key = {"pairs": digest, "policy": str(Path(self.policy).resolve()),
               "length_normalize": self.cfg.dpo.length_normalize}
        if path.is_file():
            cached = json.loads(path.read_text())
            if cached["key"] == key:
                return cached
        if self.resume_from:
            raise RunError(f"{path} is missing or was computed for other pairs; a resumed run needs the reference "
                           "log-probs of its start. Start the run again without --resume")
        started = time.perf_counter()
        norm = self.cfg.dpo.length_normalize
        out = {"key": key, "train": self.learner.pair_logprobs(self.pairs, norm),
               "eval": self.learner.pair_logprobs(self.eval_pairs, norm)}
        self.timings["reference_seconds"] = time.perf_counter() - started
        path.write_text(json.dumps(out))
        self.log(f"reference log-probs of {len(self.pairs) + len(self.eval_pairs)} pairs in "
                 f"{self.timings['reference_seconds']:.1f} s (cached in {path})")
        return out

    # ---- the loop ------------------------------------------------------------------------------
    def next_batch(self) -> list[int]:
        n, want = len(self.pairs), min(self.section.batch_size, len(self.pairs))
        picked: list[int] = []
        while len(picked) < want:
            if self.cursor >= len(self.order):
                self.order = list(range(n))
                random.Random(self.section.seed + self.step).shuffle(self.order)
                self.cursor = 0
            take = self.order[self.cursor : self.cursor + want - len(picked)]
            picked += take
            self.cursor += len(take)
        return picked

    def train_step(self, picked: list[int]) -> dict[str, float]:
        return self.learner.preference_step([self.pairs[i] for i in picked],
                                            [self.reference["train"][i] for i in picked], self.cfg.dpo)

    def evaluate(self) -> dict[str, float]:
        stats = self.learner.preference_step(self.eval_pairs, self.reference["eval"], self.cfg.dpo, train=False)
        out = {f"eval/{k.split('/', 1)[1]}_heldout": v for k, v in stats.items()}
        out.update(self.greedy_score())
        return out

    def greedy_score(self) -> dict[str, float]:
        """The held-out score: greedy responses to the main eval set, scored by the configured reward."""
        from cluster.evaluation import local_score

        out = {}
        prompts = next(iter(self.data.eval_sets.values()))
        responses = self.learner.greedy_responses([p.text for p in prompts], self.cfg.generation.max_tokens)
        if self._score is None:  # one scorer (and its event loop) for the run, not one per evaluation
            self._score = local_score(self.cfg.train.eval_reward or self.cfg.reward.sources)
        scores = self._score([p.text for p in prompts], responses, [p.metadata for p in prompts])
        out["eval/task_score"] = sum(scores) / len(scores)
        self.evals.append((self.step, out["eval/task_score"]))
        return out

    def checkpoint(self, name: str, elapsed: float) -> Path:
        state = {"step": self.step, "cursor": self.cursor, "order": self.order, "evals": self.evals,
                 "elapsed": elapsed, "kind": self.kind, "metrics_offset": self.logger.offset() if self.logger else 0}
        path = checkpoint.write(self.run_dir, name, lambda staging: self.learner.save(str(staging.resolve())),
                                state, previous=self.last_checkpoint)
        self.last_checkpoint = path
        checkpoint.prune(self.run_dir, self.cfg.checkpoint.keep_last)
        return path

    def run(self) -> dict:
        from core.metrics import JsonlLogger, MetricSink

        cfg, d = self.cfg, self.section
        sink = MetricSink("driver") if cfg.metrics.prometheus else None  # offline/* are the driver's here
        log_path = self.run_dir / "metrics.jsonl"
        if self.metrics_offset is not None and log_path.is_file():  # the steps after the checkpoint are redone
            with log_path.open("r+b") as f:
                f.truncate(self.metrics_offset)
        from core.report import RunReporters

        jsonl = self.logger = JsonlLogger(log_path)
        logger = _Both(jsonl, RunReporters(cfg.metrics.report_to, self.run_dir, cfg.model_dump(mode="json"),
                                           resumed_at=self.step if self.evals else None))
        started, last_ckpt = time.time(), time.time()
        try:
            if not self.evals:
                start = self.evaluate()
                logger.write(0, start)
                self.log(f"step 0: held-out score {start['eval/task_score']:.3f} (the start)")
            while True:
                elapsed = self.elapsed_before + time.time() - started
                if (d.steps is not None and self.step >= d.steps) or \
                        (d.time_limit_s is not None and elapsed >= d.time_limit_s):
                    break
                picked = self.next_batch()
                t0 = time.perf_counter()
                stats = self.train_step(picked)
                self.step += 1
                stats["offline/step_seconds"] = time.perf_counter() - t0
                if self.step % d.eval_every == 0:
                    stats.update(self.evaluate())
                    extra = "".join(f", {k.split('/')[1].removesuffix('_heldout')} {stats[k]:.3f}" for k in
                                    ("eval/accuracy_heldout", "eval/margin_heldout") if k in stats)
                    self.log(f"step {self.step}: held-out score {stats['eval/task_score']:.3f}{extra}, loss "
                             f"{stats['offline/loss']:.3f}")
                logger.write(self.step, stats)
                if sink:
                    sink.log({k: v for k, v in stats.items() if k.startswith("offline/")})
                c = cfg.checkpoint
                if (c.every and self.step % c.every == 0) or (c.every_s and time.time() - last_ckpt >= c.every_s):
                    self.checkpoint(f"step-{self.step}", self.elapsed_before + time.time() - started)
                    last_ckpt = time.time()
            if self.step % d.eval_every:
                final = self.evaluate()
                logger.write(self.step, final)
            elapsed = self.elapsed_before + time.time() - started
            path = self.checkpoint("final", elapsed)
        finally:
            logger.close()
        scores = [s for _, s in self.evals]
        last3 = sum(scores[-3:]) / len(scores[-3:])
        summary = {"algorithm": f"offline {getattr(d, 'loss', self.kind)}", "steps": self.step,
                   "train_seconds": round(elapsed, 1), **{k: round(v, 1) for k, v in self.timings.items()},
                   "pairs": len(self.pairs), "eval_pairs": len(getattr(self, "eval_pairs", [])),
                   "eval_start": scores[0], "eval_final": scores[-1], "eval_last3_mean": last3,
                   "eval_gain_points": 100 * (last3 - scores[0]),
                   "eval_best": max(scores), "checkpoint": str(path)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


class RWRRun(DPORun):
    """``relay rwr``: (prompt, response, reward) records, each step's weights ``losses.rwr_weights`` over its batch
    (rewards whitened, then exp(z / beta) normalised to mean 1; ``rwr.whiten: false``: exp(r / beta) of the raw
    rewards), the loss their weighted sequence log-likelihood. No reference; the evaluation is the greedy score.
    ``self.pairs`` holds the records (the loop is DPO's)."""

    kind = "rwr"

    @property
    def section(self):
        return self.cfg.rwr

    def _records(self) -> None:
        from core.data import SourceConfig, read_rows
        from learner.preferences import encode_rewarded

        cfg, r = self.cfg, self.cfg.rwr
        path = self.run_dir / PAIRS_DIR / "records.jsonl"
        started = time.perf_counter()
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines()]
        elif r.path:
            rows = read_rows(SourceConfig(path=r.path), cfg.data.on_invalid, log=self.log)
        else:
            prompts, _, samples, scores = scored_samples(cfg, self.policy, self.data, r.policy_samples, r.seed)
            rows = [{"prompt": p, "response": s, "reward": x}
                    for p, ss, xs in zip(prompts, samples, scores, strict=True)
                    for s, x in zip(ss, xs, strict=True) if s.strip()]
            self.log(f"built {len(rows)} records from {r.policy_samples} samples x {len(prompts)} training "
                     f"prompts in {time.perf_counter() - started:.1f} s")
        _write_jsonl(path, rows)
        self.timings["records_seconds"] = time.perf_counter() - started
        self.pairs = encode_rewarded(rows, self.data.tokenizer, cfg.generation.max_model_len, cfg.data.on_invalid,
                                     where="records", log=self.log)
        self.log(f"{len(self.pairs)} records")

    def train_step(self, picked: list[int]) -> dict[str, float]:
        import torch

        from learner.losses import rwr_weights

        r = self.cfg.rwr
        rewards = torch.tensor([self.pairs[i].reward for i in picked])
        if r.whiten:
            weights = rwr_weights(rewards, beta=r.beta)
        else:
            weights = torch.softmax(rewards / r.beta, dim=0) * len(picked)
        stats = self.learner.weighted_nll_step([self.pairs[i] for i in picked], weights.tolist())
        stats["offline/weight_max"] = float(weights.max())
        return stats

    def evaluate(self) -> dict[str, float]:
        return self.greedy_score()


def train_dpo(cfg: RelayConfig, log: Callable[[str], object] = print, resume: bool = False) -> dict:
    """``relay dpo``: pairs, reference log-probs, the loop; returns the summary (also in ``summary.json``)."""
    return train_offline(DPORun, cfg, log, resume)


def train_rwr(cfg: RelayConfig, log: Callable[[str], object] = print, resume: bool = False) -> dict:
    """``relay rwr``: records, the loop; returns the summary (also in ``summary.json``)."""
    return train_offline(RWRRun, cfg, log, resume)


def train_offline(run_class: type[DPORun], cfg: RelayConfig, log: Callable[[str], object] = print,
                  resume: bool = False) -> dict:
    from cluster.resources import check_resources, init_ray

    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = checkpoint.RunDirLock(run_dir)
    lock.acquire()
    try:
        resume_from = checkpoint.latest(run_dir) if resume else None
        if resume and resume_from is None:
            raise RunError(f"nothing to resume in {run_dir}: no complete checkpoint; start it without --resume")
        if not resume and (run_dir / "config.json").exists():  # never mix a new run with an earlier one's pairs
            moved = checkpoint.move_aside(run_dir, lock)
            log(f"train.run_dir {run_dir} held an earlier run; moved it to {moved}")
        (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2) + "\n")
        run = run_class(cfg, log, resume_from)
        run.prepare()
        connected = init_ray(cfg, log=log, log_to_driver=cfg.metrics.log_to_driver)
        try:
            check_resources(cfg.model_copy(update={"generation": cfg.generation.model_copy(
                update={"num_actors": 0})}))  # no generation actors offline
            run.start()
            try:
                return run.run()
            finally:
                run.learner.kill()
        finally:
            if connected:
                import ray

                ray.shutdown()
    finally:
        lock.release()


class _Both:
    """The JSONL log and the trackers of ``metrics.report_to``, written together."""

    def __init__(self, *outs):
        self.outs = outs

    def write(self, step: int, metrics: dict) -> None:
        for out in self.outs:
            out.write(step, metrics)

    def close(self) -> None:
        for out in self.outs:
            out.close()
