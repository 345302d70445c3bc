"""The driver: places actors, runs the on-policy loop, logs every step, checkpoints.

Runs in the process that ``relay train`` starts, locally or under ``ray job submit``.
Per step: shard prompts across generation actors -> score through the reward service ->
one learner update -> publish weights once -> every actor loads them. A crashed generation
actor is restarted by Ray (``max_restarts``), caught up from the latest published version,
and its shard is sampled again.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cluster.config import RelayConfig
from cluster.progress import Progress
from cluster.resources import check_resources, init_ray, oversubscription_warning
from core.data import DataConfig, DataError, Example, Splits, format_prompt, load_splits
from core.metrics import JsonlLogger, MetricSink
from core.records import Prompt, Rollout, ScoredRollout
from learner.weights import VersionStore
from reward_service.client import RewardClient
from reward_service.records import RewardRequest


class RunError(RuntimeError):
    """A problem the user can fix, reported without a traceback by the CLI."""


def resolve_policy(cfg: RelayConfig, log=print) -> str:
    """The policy checkpoint directory: the configured path, or the embedded default (built once)."""
    if cfg.model.path is None:
        import torch

        from learner.bootstrap import ensure_default_policy

        # One thread: on 2 shared cores, two spinning OpenMP threads made SFT ~20x slower (measured).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return str(ensure_default_policy(Path(cfg.model.cache_dir), cfg.sft, cfg.model.tiny, cfg.data, log=log))
        finally:
            torch.set_num_threads(threads)
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise RunError(f"model.path {str(path)!r} is not a Hugging Face checkpoint directory (no config.json); "
                       "point it at a directory written by save_pretrained, or set it to null for the embedded model")
    return str(path)


def encode_prompts(examples: list[Example], data: DataConfig, tokenizer, max_prompt_tokens: int, where: str,
                   log=print) -> list[Prompt]:
    """Format and tokenise ``examples``; a prompt over ``max_prompt_tokens`` follows ``data.on_invalid``."""
    prompts, too_long = [], 0
    for e in examples:
        text = format_prompt(e, data, tokenizer)
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) > max_prompt_tokens:
            if data.on_invalid == "error":
                raise DataError(f"{where}: prompt {text[:60]!r} has {len(ids)} tokens, more than generation."
                                f"max_model_len - generation.max_tokens = {max_prompt_tokens}. Raise max_model_len (up "
                                "to the model's context), shorten the prompt, or set data.on_invalid: skip")
            too_long += 1
            continue
        prompts.append(Prompt(len(prompts), text, ids, e.metadata))
    if too_long:
        log(f"data: skipped {too_long} {where} prompts longer than {max_prompt_tokens} tokens")
    if not prompts:
        raise DataError(f"{where}: no prompt fits in {max_prompt_tokens} tokens")
    return prompts


@dataclass
class Fleet:
    """The generation actors and the version each one holds."""

    actors: list
    timeout_s: float
    versions: list[int] = field(default_factory=list)

    def call(self, fn):
        """``fn(actor) -> ObjectRef`` on every actor; results in actor order."""
        return ray.get([fn(a) for a in self.actors], timeout=self.timeout_s)


class Driver:
    def __init__(self, cfg: RelayConfig, policy_path: str, splits: Splits | None = None, log=print):
        """``splits``: the data, already read (``train`` reads it before Ray starts); None = read it now."""
        self.cfg, self.log = cfg, log
        splits = splits or load_splits(cfg.data, cfg.model.cache_dir, log=log)
        self.run_dir = Path(cfg.train.run_dir)
        self.policy_path = policy_path
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or policy_path)
        g, n_eval = cfg.generation, cfg.train.eval_prompts
        room = g.max_model_len - g.max_tokens
        self.train_prompts = encode_prompts(splits.train, cfg.data, self.tokenizer, room, "train", log)
        if len(self.train_prompts) < cfg.train.prompts_per_step:
            raise RunError(f"train.prompts_per_step ({cfg.train.prompts_per_step}) exceeds the "
                           f"{len(self.train_prompts)} training prompts: the dataset is too small for one step")
        self.eval_sets = {name: encode_prompts(ex[:n_eval], cfg.data, self.tokenizer, room, f"eval set {name!r}", log)
                          for name, ex in splits.eval.items()}
        self.eval_prompts = next(iter(self.eval_sets.values()))
        self.eval_reward = None  # a second reward app when train.eval_reward is set (start())
        self.rng = random.Random(cfg.train.seed)
        self.order: list[int] = []
        self.store = VersionStore(cfg.checkpoint.keep_versions)
        self.sink = MetricSink("driver") if cfg.metrics.prometheus else None
        self.restarts = 0
        self.evaluator = None  # cluster.evaluation.Evaluator, built at the first evaluation
        self._service_counts: dict[str, float] = {}  # the reward service's counters at the last step

    # ---- placement -----------------------------------------------------------------------------
    def start(self) -> None:
        from actors.generation import GenerationActor
        from learner.learner import Learner

        g, lc = self.cfg.generation, self.cfg.learner
        learner_cls = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(Learner)
        gen_cls = ray.remote(num_cpus=g.num_cpus, num_gpus=g.num_gpus, max_restarts=g.max_restarts,
                             max_task_retries=0)(GenerationActor)
        env = {"env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
            # ERROR: every in-place reload warns that RotaryEmbedding and the tied LM head had no weights
            # to load, which is expected (the head is re-tied after the reload, see actors/vllm_ext.py).
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        }}
        self.learner = learner_cls.options(runtime_env=env).remote(
            self.policy_path, self.cfg.algorithm, lc, self.cfg.model.dtype, g.temperature, g.max_tokens)
        actors = [gen_cls.options(runtime_env=env).remote(g, self.policy_path, self.cfg.model.dtype, i)
                  for i in range(g.num_actors)]
        self.fleet = Fleet(actors, g.timeout_s + 120.0, [0] * len(actors))
        self.fleet.call(lambda a: a.health.remote())  # engines are up (start takes ~20 s on CPU)
        self.reward = RewardClient.deploy(self.cfg.reward)
        if self.cfg.train.eval_reward:
            r = self.cfg.reward
            self.eval_reward = RewardClient.deploy(  # a second app on the same Serve (and its HTTP settings)
                r.model_copy(update={"sources": self.cfg.train.eval_reward, "normalize": False, "clip": None}),
                app_name="relay-eval-reward")

    # ---- the loop pieces -------------------------------------------------------------------------
    def next_prompts(self) -> list[Prompt]:
        n = self.cfg.train.prompts_per_step
        if len(self.order) < n:
            fresh = list(range(len(self.train_prompts)))
            self.rng.shuffle(fresh)
            self.order.extend(fresh)
        picked, self.order = self.order[:n], self.order[n:]
        # group ids = position in this step's batch, unique across actors
        return [Prompt(j, self.train_prompts[i].text, self.train_prompts[i].token_ids, self.train_prompts[i].metadata)
                for j, i in enumerate(picked)]

    def _shards(self, prompts: list[Prompt]) -> list[list[Prompt]]:
        """Contiguous shards of near-equal size, one per actor, so results concatenate in prompt order."""
        k, n = len(self.fleet.actors), len(prompts)
        bounds = [i * n // k for i in range(k + 1)]
        return [prompts[bounds[i]:bounds[i + 1]] for i in range(k)]

    def fan_out(self, method: str, prompts: list[Prompt], *args) -> list:
        """``generate`` (rollouts) or ``greedy`` (texts) of ``prompts`` on all actors at once, in prompt order."""
        shards = self._shards(prompts)
        refs = [getattr(a, method).remote(s, *args) for a, s in zip(self.fleet.actors, shards, strict=True)]
        results = self._gather(method, shards, refs, *args)
        return [x for r in results for x in (r[0] if method == "generate" else r)]

    def _gather(self, method: str, shards: list[list[Prompt]], refs: list, *args) -> list:
        """Each actor's result; an actor that died is restarted, caught up and asked again."""
        results = []
        for i, ref in enumerate(refs):
            try:
                results.append(ray.get(ref, timeout=self.fleet.timeout_s))
            except ray.exceptions.RayActorError:
                results.append(self._on_actor(i, method, shards[i], *args))
        return results

    def _on_actor(self, i: int, method: str, *args):
        """Call one actor; if it died, let Ray restart it, catch it up to the latest version, retry once."""
        actor = self.fleet.actors[i]
        try:
            return ray.get(getattr(actor, method).remote(*args), timeout=self.fleet.timeout_s)
        except ray.exceptions.RayActorError as e:
            self.restarts += 1
            self.log(f"generation actor {i} died ({str(e).splitlines()[0][:120]}); waiting for its restart")
            self._catch_up(i)
            return ray.get(getattr(actor, method).remote(*args), timeout=self.fleet.timeout_s)

    def _wait_restarted(self, i: int) -> None:
        """Poll the actor until Ray has restarted it (its engine start takes ~20 s on CPU)."""
        deadline = time.monotonic() + self.fleet.timeout_s
        while True:
            try:
                ray.get(self.fleet.actors[i].health.remote(), timeout=self.fleet.timeout_s)
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _catch_up(self, i: int) -> None:
        actor = self.fleet.actors[i]
        self._wait_restarted(i)
        if self.store.latest_version > 0:
            version, ref = self.store.latest()
            ray.get(actor.update_weights.remote(version, [ref]), timeout=self.fleet.timeout_s)
            self.fleet.versions[i] = version
        if self.sink:
            self.sink.log({"system/actor_restarts_total": 1.0}, tags={"actor_id": str(i)})

    def launch(self, prompts: list[Prompt]) -> tuple[list[list[Prompt]], list, float]:
        """Start sampling ``prompts`` on the actors; returns what ``collect`` needs."""
        shards = self._shards(prompts)
        refs = [a.generate.remote(s) for a, s in zip(self.fleet.actors, shards, strict=True)]
        return shards, refs, time.perf_counter()

    def collect(self, launched) -> tuple[list[Rollout], float]:
        """Wait for a ``launch``; an actor that died is restarted, caught up and asked again."""
        shards, refs, start = launched
        results = self._gather("generate", shards, refs)
        return [r for rs, _ in results for r in rs], time.perf_counter() - start

    def generate(self, prompts: list[Prompt]) -> tuple[list[Rollout], float]:
        return self.collect(self.launch(prompts))

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], dict[str, float]]:
        start = time.perf_counter()
        requests = [RewardRequest(r.prompt_text, r.response_text, r.metadata, response_tokens=len(r.response_ids))
                    for r in rollouts]
        results = self.reward.score(requests)
        scored = [ScoredRollout(r, res.reward, res.components)
                  for r, res in zip(rollouts, results, strict=True) if res.reward is not None]
        excluded = len(rollouts) - len(scored)
        for r, res in zip(rollouts, results, strict=True):
            if res.reward is None:
                self.log(f"excluded sample (prompt {r.prompt_text!r}, response {r.response_text!r}): {res.error}")
        rewards = [s.reward for s in scored] or [0.0]
        mean = sum(rewards) / len(rewards)
        stats = {
            "reward/latency_seconds": time.perf_counter() - start,
            "reward/mean": mean,
            "reward/std": (sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5,
            "reward/task_score": self._task_score(requests, rewards),
            "reward/excluded_total": float(excluded),
        }
        if any(s.kind in ("code", "function") for s in self.cfg.reward.sources):
            stats.update(self._service_increments())
        return scored, stats

    def _service_increments(self) -> dict[str, float]:
        """This step's increments of the reward service's sandbox outcomes and function timeouts (counters kept
        per replica: a restarted replica starts from 0, so a negative difference counts as 0)."""
        now = self.reward.stats()
        out = {}
        for key, value in now.items():
            if key.startswith("code_"):
                out[f"reward/code_runs_total{{reason={key.removeprefix('code_')}}}"] = value
            elif key == "function_timeouts":
                out["reward/function_timeouts_total"] = value
        increments = {k: max(0.0, v - self._service_counts.get(k, 0.0)) for k, v in out.items()}
        self._service_counts = out
        return increments

    def _task_score(self, requests: list[RewardRequest], rewards: list[float]) -> float:
        """Mean held-out-score reward (``train.eval_reward``) of the step's samples; the training reward without."""
        if self.eval_reward is None:
            return sum(rewards) / len(rewards)
        scores = [0.0 if r.reward is None else r.reward for r in self.eval_reward.score(requests)]
        return sum(scores) / len(scores)

    def sync(self) -> dict[str, float]:
        start = time.perf_counter()
        version, ref, stats = ray.get(self.learner.publish.remote(), timeout=self.cfg.learner.timeout_s)
        self.store.add(version, ref[0])
        loads = [self._on_actor(i, "update_weights", version, ref) for i in range(len(self.fleet.actors))]
        self.fleet.versions = [version] * len(self.fleet.actors)
        stats["sync/load_seconds"] = max(x["sync/load_seconds"] + x["sync/fetch_seconds"] for x in loads)
        stats["sync/seconds"] = time.perf_counter() - start
        return stats

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation (cluster/evaluation.py): greedy true score, RM score, win rate and KL vs the
        reference, length, distinct-n, reward-hacking flag. The first call (step 0) caches the reference's."""
        if self.evaluator is None:
            from cluster.evaluation import driver_evaluator

            self.evaluator = driver_evaluator(self)
        return self.evaluator(log=self.log)

    def rollout_stats(self, rollouts: list[Rollout], seconds: float, version: int) -> dict[str, float]:
        n_tokens = sum(len(r.response_ids) for r in rollouts)
        return {
            "rollout/generation_seconds": seconds,
            "rollout/tokens_per_second": n_tokens / max(seconds, 1e-9),
            "rollout/generated_tokens_total": float(n_tokens),
            "rollout/samples_total": float(len(rollouts)),
            "rollout/response_length_mean_tokens": n_tokens / len(rollouts),
            "rollout/staleness_versions": float(version - min(r.policy_version for r in rollouts)),
            "reward/truncated_total": float(sum(r.finish_reason == "length" for r in rollouts)),
        }

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
        logger = JsonlLogger(self.run_dir / "metrics.jsonl") if cfg.metrics.jsonl else None
        first_eval = self.evaluate()
        self._emit(logger, 0, first_eval)
        self.log(f"step 0: held-out score {first_eval['eval/task_score']:.3f} (the start)")
        evals = [(0, first_eval["eval/task_score"])]
        start, step, version, inflight = time.time(), 0, 0, deque()
        progress = Progress(cfg.train.steps, started_at=start, time_limit_s=cfg.train.time_limit_s) \
            if cfg.metrics.progress else None
        while step < cfg.train.steps:
            if cfg.train.time_limit_s and time.time() - start > cfg.train.time_limit_s:
                self.log(f"time limit of {cfg.train.time_limit_s:.0f} s reached after {step} steps")
                break
            step += 1
            metrics = self._step(version, inflight)
            version = self.store.latest_version
            if step % cfg.train.eval_every == 0:
                metrics.update(self.evaluate())
                evals.append((step, metrics["eval/task_score"]))
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
                self.checkpoint(f"step_{step}")
            self._emit(logger, step, metrics)
            if progress:
                progress.update(step, metrics)
        if evals[-1][0] != step:
            final = self.evaluate()
            evals.append((step, final["eval/task_score"]))
            self._emit(logger, step, final)
        if progress:
            progress.close()
        ckpt = self.checkpoint("final")
        summary = self._summary(evals, step, time.time() - start, ckpt)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if progress:
            self.log(progress.summary({k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in summary.items()}))
        if logger:
            logger.close()
        return summary

    def _step(self, version: int, inflight: deque) -> dict[str, float]:
        """One step. With ``max_staleness`` s > 0, s generations are launched ahead and run while the
        learner trains, with the weights the actors hold; every rollout carries its policy_version and
        the sampler's logprobs feed the importance correction (TIS)."""
        t0 = time.perf_counter()
        s = self.cfg.algorithm.max_staleness
        if not inflight:
            inflight.append(self.launch(self.next_prompts()))
        rollouts, gen_seconds = self.collect(inflight.popleft())
        metrics = self.rollout_stats(rollouts, gen_seconds, version)
        fresh = [r for r in rollouts if version - r.policy_version <= s]
        if len(fresh) < len(rollouts):  # never train on samples older than allowed
            self.log(f"dropped {len(rollouts) - len(fresh)} rollouts older than algorithm.max_staleness={s}")
            rollouts = fresh
        while len(inflight) < s:  # sample ahead while the learner trains
            inflight.append(self.launch(self.next_prompts()))
        scored, reward_stats = self.score(rollouts)
        metrics.update(reward_stats)
        learner_stats = ray.get(self.learner.train_step.remote(scored), timeout=self.cfg.learner.timeout_s)
        metrics.update(learner_stats)
        metrics.update(self.sync())
        metrics["system/step_seconds"] = time.perf_counter() - t0
        return metrics

    def _emit(self, logger, step: int, metrics: dict[str, float]) -> None:
        if logger:
            logger.write(step, metrics)
        if self.sink:
            self.sink.log({k: v for k, v in metrics.items() if _driver_exports(k)})
            for i, v in enumerate(self.fleet.versions):
                self.sink.log({"sync/policy_version": float(v)}, tags={"actor_id": str(i)})
            self.sink.heartbeat()

    def checkpoint(self, name: str) -> str:
        path = str((self.run_dir / "checkpoints" / name).resolve())
        return ray.get(self.learner.save.remote(path), timeout=self.cfg.learner.timeout_s)

    def _summary(self, evals: list[tuple[int, float]], steps: int, seconds: float, ckpt: str) -> dict:
        last3 = [s for _, s in evals[-3:]]
        start_score = evals[0][1]
        return {
            "steps": steps,
            "rl_seconds": round(seconds, 1),
            "eval_start": start_score,
            "eval_final": evals[-1][1],
            "eval_last3_mean": sum(last3) / len(last3),
            "eval_gain_points": 100 * (sum(last3) / len(last3) - start_score),
            "eval_best": max(s for _, s in evals),
            "actor_restarts": self.restarts,
            "checkpoint": ckpt,
        }

    def shutdown(self) -> None:
        for client in (self.eval_reward, self.reward):
            try:
                if client is not None:
                    client.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


# Exported to Prometheus by the component that measures them, with its own labels.
_EXPORTED_ELSEWHERE = ("learner/", "rollout/generated_tokens_total", "rollout/generation_seconds")


def _driver_exports(key: str) -> bool:
    from core.metrics import METRICS, split_key

    return split_key(key)[0] in METRICS and not key.startswith(_EXPORTED_ELSEWHERE)


def train(cfg: RelayConfig, log=print) -> dict:
    """``relay train``: build or find the policy, start Ray, run the loop, return the summary."""
    splits = load_splits(cfg.data, cfg.model.cache_dir, log=log)  # bad data fails here, before Ray starts
    connected = init_ray(cfg.cluster, log=log)
    try:
        check_resources(cfg)  # before minutes of SFT, so an impossible request fails at once
        if warning := oversubscription_warning(cfg):
            log(f"warning: {warning}")
        policy_path = resolve_policy(cfg, log=log)
        driver = Driver(cfg, policy_path, splits, log=log)  # validates the prompts before any actor starts
        driver.start()
        try:
            return driver.run()
        finally:
            driver.shutdown()
    finally:
        if connected:
            ray.shutdown()
