"""The driver: places actors, runs the loop, logs every step, checkpoints.

Runs in the process that ``relay train`` starts (``cluster/train.py``), locally or under ``ray job submit``.
On-policy (``algorithm.max_staleness: 0``), per step: shard prompts across generation actors ->
score through the reward service -> one learner update -> publish weights once -> every actor
loads them. Streaming (``max_staleness`` s >= 1): the fleet samples all the time and groups are
scored as they land (``cluster/stream.py``); a step takes a step's worth from the rollout buffer,
the learner trains while the stream goes on, and the new weights are fetched by the actors in the
background and swapped in between requests. A crashed generation actor is restarted by Ray
(``max_restarts``), caught up from the latest published version, and its shard is sampled again.
Checkpoints, a dead learner's restore and a graceful stop are ``cluster/recovery.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray

from cluster import checkpoint
from cluster.config import RelayConfig
from cluster.errors import LearnerDied, RunError, WeightsLost
from cluster.fleet import Fleet, Launch
from cluster.progress import Progress
from cluster.recovery import Recovery, _graceful_stop
from cluster.rollout_buffer import Group, RolloutBuffer, by_group
from cluster.stream import RolloutStream
from core import heap
from core.data import DataConfig, DataError, Example, Splits, format_prompt, load_splits
from core.metrics import JsonlLogger, MetricSink
from core.records import Prompt, Rollout, ScoredRollout
from learner.group import GroupCall
from learner.weights import VersionStore
from reward_service.client import RewardClient
from reward_service.records import RewardRequest


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
    check_model_path(cfg)
    return str(cfg.model.path)


def check_model_path(cfg: RelayConfig) -> None:
    """A configured ``model.path`` must be a Hugging Face checkpoint directory (checked before Ray starts)."""
    path = Path(cfg.model.path) if cfg.model.path is not None else None
    if path is not None and not (path / "config.json").is_file():
        raise RunError(f"model.path {str(path)!r} is not a Hugging Face checkpoint directory (no config.json); "
                       "point it at a directory written by save_pretrained, or set it to null for the embedded model")


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
class Encoded:
    """The run's prompts, tokenised and checked against the context: known before Ray starts."""

    tokenizer: object
    train: list[Prompt]
    eval_sets: dict[str, list[Prompt]]


def encode_data(cfg: RelayConfig, splits: Splits, tokenizer=None, log=print) -> Encoded:
    """Tokenise the splits with ``tokenizer``, by default the run's: ``model.tokenizer``, else ``model.path``'s,
    else the embedded model's (a byte-level one built without data, so known before its SFT)."""
    if tokenizer is None and (cfg.model.tokenizer or cfg.model.path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path)
    elif tokenizer is None:
        from learner.bootstrap import build_tokenizer

        tokenizer = build_tokenizer()
    g, n_eval = cfg.generation, cfg.train.eval_prompts
    room = g.max_model_len - g.max_tokens
    train = encode_prompts(splits.train, cfg.data, tokenizer, room, "train", log)
    if len(train) < cfg.train.prompts_per_step:
        raise RunError(f"train.prompts_per_step ({cfg.train.prompts_per_step}) exceeds the {len(train)} training "
                       "prompts: the dataset is too small for one step")
    eval_sets = {name: encode_prompts(ex[:n_eval], cfg.data, tokenizer, room, f"eval set {name!r}", log)
                 for name, ex in splits.eval.items()}
    return Encoded(tokenizer, train, eval_sets)


class Driver(Recovery):
    def __init__(self, cfg: RelayConfig, policy_path: str, data: Splits | Encoded | None = None, log=print,
                 resume_from: Path | None = None, layout: dict[str, list] | None = None):
        """``policy_path``: the starting policy, which is also the frozen reference; ``data``: the splits, or
        already encoded (``train`` does both before Ray starts), None = read them now; ``resume_from``: a
        checkpoint of this run to continue from (``cluster/checkpoint.py``); ``layout``: the generation
        actors' own cores and the shared ones (``cluster.resources.core_layout``), None = unpinned."""
        self.cfg, self.log, self.layout = cfg, log, layout
        if not isinstance(data, Encoded):
            from transformers import AutoTokenizer

            splits = data or load_splits(cfg.data, cfg.model.cache_dir, log=log)
            data = encode_data(cfg, splits, AutoTokenizer.from_pretrained(cfg.model.tokenizer or policy_path), log)
        self.run_dir = Path(cfg.train.run_dir)
        self.policy_path = policy_path
        self.resume_from = resume_from
        self.tokenizer, self.train_prompts, self.eval_sets = data.tokenizer, data.train, data.eval_sets
        self.eval_prompts = next(iter(self.eval_sets.values()))
        self.eval_reward = None  # a second reward app when train.eval_reward is set (start())
        self.rng = random.Random(cfg.train.seed)
        self.order: list[int] = []  # training prompt indices still to draw, in order
        self.inflight: deque[tuple[list[int], Launch]] = deque()  # this step's launch (on-policy): picks, launch
        self.stream: RolloutStream | None = None  # the streaming loop's producer (max_staleness >= 1)
        self.step, self.evals, self.elapsed_before = 0, [], 0.0  # evals: (step, held-out score)
        self.store = VersionStore(cfg.checkpoint.keep_versions)
        self.sink = MetricSink("driver") if cfg.metrics.prometheus else None
        self.evaluator = None  # cluster.evaluation.Evaluator, built at the first evaluation
        self.logger: JsonlLogger | None = None
        self.learner_restores = 0
        self.last_checkpoint: Path | None = resume_from
        self._service_counts: dict[str, float] = {}  # the reward service's counters at the last step
        self._stop: str | None = None  # set by SIGTERM / Ctrl-C: checkpoint after this step and exit

    # ---- placement -----------------------------------------------------------------------------
    def start(self) -> None:
        g = self.cfg.generation
        self.runtime_env = {"env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")])),
            # ERROR: every in-place reload warns that RotaryEmbedding and the tied LM head had no weights
            # to load, which is expected (the head is re-tied after the reload, see actors/vllm_ext.py).
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        }}
        state = checkpoint.read_state(self.resume_from) if self.resume_from else None
        start_path = str(self.resume_from) if state else self.policy_path
        self.learner = self._start_learner(start_path, with_state=state is not None)
        layout = self.layout or {}
        self.fleet = Fleet(g, start_path, self.cfg.model.dtype, self.store, self.runtime_env,
                           cores=layout.get("actors"), background_cores=layout.get("rest"),
                           version=state["version"] if state else 0, log=self.log, sink=self.sink)
        self.fleet.start()
        if self.cfg.algorithm.max_staleness > 0:
            self.stream = self._build_stream()
        self.reward = RewardClient.deploy(self.cfg.reward)
        if self.cfg.train.eval_reward:
            r = self.cfg.reward
            self.eval_reward = RewardClient.deploy(  # a second app on the same Serve (and its HTTP settings)
                r.model_copy(update={"sources": self.cfg.train.eval_reward, "normalize": False, "clip": None}),
                app_name="relay-eval-reward")
        if state:
            self._restore(state)

    def _build_stream(self) -> RolloutStream:
        a, per_step = self.cfg.algorithm, self.cfg.train.prompts_per_step
        buffer = RolloutBuffer(capacity=a.max_staleness * per_step, max_staleness=a.max_staleness,
                               filters=("uniform",) if a.dynamic_sampling else ())
        g = self.cfg.generation
        chunk = g.stream_chunk_prompts or max(1, per_step // (2 * g.num_actors))  # a step in flight over the fleet
        return RolloutStream(self.fleet, buffer, self.next_prompts, self.score, min(chunk, buffer.capacity),
                             max_filtered=a.max_extra_prompts_per_step if a.dynamic_sampling else None)

    def _start_learner(self, path: str, with_state: bool):
        """The learner group (``learner.num_workers`` ranks) on the policy at ``path`` (the reference stays
        ``policy_path``), continuing from the checkpoint at ``path`` if ``with_state``."""
        from learner.group import LearnerGroup, RankFailed

        lc, g = self.cfg.learner, self.cfg.generation
        try:
            args = (path, self.cfg.algorithm, lc, self.cfg.model.dtype, g.temperature, g.max_tokens)
            learner = LearnerGroup(lc, args, {"reference_path": self.policy_path, "seed": self.cfg.train.seed,
                                              "min_tokens": g.min_tokens},
                                   self.runtime_env, start_timeout_s=g.start_timeout_s)
        except RankFailed as e:
            raise LearnerDied(str(e)) from None
        if with_state:
            try:
                learner.load_state(path)
            except BaseException as e:
                learner.kill()
                if isinstance(e, RankFailed):
                    raise LearnerDied(str(e)) from None
                raise
        return learner

    # ---- the loop pieces -------------------------------------------------------------------------
    def next_prompts(self, n: int | None = None, first_group: int = 0) -> tuple[list[int], list[Prompt]]:
        """The next ``n`` (default ``train.prompts_per_step``) training prompt indices, and the prompts with group
        ids = ``first_group`` + position in the batch."""
        n = n or self.cfg.train.prompts_per_step
        if len(self.order) < n:
            fresh = list(range(len(self.train_prompts)))
            self.rng.shuffle(fresh)
            self.order.extend(fresh)
        picked, self.order = self.order[:n], self.order[n:]
        return picked, [Prompt(first_group + j, self.train_prompts[i].text, self.train_prompts[i].token_ids,
                               self.train_prompts[i].metadata) for j, i in enumerate(picked)]

    def launch(self, step: int, version: int | None = None) -> tuple[list[int], Launch]:
        """Start sampling the prompts of ``step`` on the fleet (``version``: the one every rollout must carry)."""
        picked, prompts = self.next_prompts()
        seeds = [sampling_seed(self.cfg.train.seed, step, p.index) for p in prompts] \
            if self.cfg.train.deterministic else None
        return picked, self.fleet.launch(prompts, seeds=seeds, version=version)

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

    def sync(self, launch_next: bool = False) -> dict[str, float]:
        """Publish the learner's weights once and have every actor load them. ``launch_next`` (on-policy): launch
        the next step's batch before waiting for the loads; each actor samples it right after its own load, so
        the driver's wait and the next call's hop are off the critical path."""
        start = time.perf_counter()
        version, ref, stats = self._publish()
        loading = self.fleet.start_load(version, ref)
        if launch_next:
            self.inflight.append(self.launch(self.step + 1, version))
        stats.update(self.fleet.finish_load(version, loading))  # WeightsLost: the learner died after publishing
        stats["sync/seconds"] = time.perf_counter() - start
        return stats

    def _publish(self, queued: GroupCall | None = None) -> tuple[int, object, dict[str, float]]:
        """The learner puts its weights once (``queued``: a publish already sent); the ref goes into the version
        store."""
        version, ref, stats = self._learner_call(queued.results)[0] if queued else self._learner_call(
            self.learner.publish)
        self.store.add(version, ref[0])
        return version, ref[0], stats

    def evaluate(self) -> dict[str, float]:
        """Held-out evaluation (cluster/evaluation.py): greedy true score, RM score, win rate and KL vs the
        reference, length, distinct-n, reward-hacking flag. The first call (step 0) caches the reference's."""
        if self.evaluator is None:
            from cluster.evaluation import driver_evaluator

            self.evaluator = driver_evaluator(self)
            if self._evaluator_state is not None:
                self.evaluator.restore(self._evaluator_state)
        return self.evaluator(log=self.log)

    _evaluator_state: dict | None = None

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
        self._open_log()
        if self.resume_from is None:
            first_eval = self.evaluate()
            self._emit(0, first_eval)
            self.log(f"step 0: held-out score {first_eval['eval/task_score']:.3f} (the start)")
            self.evals = [(0, first_eval["eval/task_score"])]
        else:
            self.log(f"resumed from {self.resume_from} at step {self.step} (version {self.store.latest_version})")
        start = time.time()
        self.last_checkpoint_time = start
        progress = Progress(cfg.train.steps, started_at=start - self.elapsed_before,
                            time_limit_s=cfg.train.time_limit_s) if cfg.metrics.progress else None
        with _graceful_stop(self), heap.frozen():  # start-up's objects out of the collector's full passes
            while self.step < cfg.train.steps and not self._stop:
                elapsed = self.elapsed_before + time.time() - start
                if cfg.train.time_limit_s and elapsed > cfg.train.time_limit_s:
                    self.log(f"time limit of {cfg.train.time_limit_s:.0f} s reached after {self.step} steps")
                    break
                metrics = self._guarded_step()
                if metrics is None:  # the learner was restored from a checkpoint: self.step went back
                    continue
                if self.step % cfg.train.eval_every == 0 and self.stream is None:
                    try:
                        metrics.update(self.evaluate())
                    except WeightsLost as e:  # the learner died under it: restored, the steps since redone
                        self._restore_learner(e)
                        continue
                    self.evals.append((self.step, metrics["eval/task_score"]))
                elif self.step % cfg.train.eval_every == 0:
                    self._start_eval()
                self._emit(self.step, metrics)
                evaluated = self._finish_eval(wait=False)  # a background evaluation that finished, logged at its step
                if progress:
                    progress.update(self.step, {**metrics, **evaluated})
                if self._checkpoint_due():
                    try:
                        self.checkpoint(f"step_{self.step}", elapsed=self.elapsed_before + time.time() - start)
                    except LearnerDied as e:  # the previous checkpoint is intact: restore from it
                        self._restore_learner(e)
        self._finish_eval(wait=True)
        rl_seconds = self.elapsed_before + time.time() - start
        if progress:
            progress.close()
        if self._stop:
            self.log(f"{self._stop}: the step in flight finished; writing a checkpoint (Ctrl-C again to stop at once)")
            path = self._last_checkpoint(f"step_{self.step}", rl_seconds)
            self.log(f"stopped by {self._stop} after step {self.step}; checkpoint {path}. Continue with: "
                     f"relay train --resume {self.run_dir}")
            self._close_log()
            return self._summary(rl_seconds, str(path), interrupted=self._stop)
        if self.evals[-1][0] != self.step:
            try:
                final = self.evaluate()
            except WeightsLost as e:  # rare: an actor's catch-up met the lost version; the steps since are not saved
                then = (f"the last checkpoint is {self.last_checkpoint}. Continue with: relay train --resume "
                        f"{self.run_dir}") if self.last_checkpoint else "no checkpoint was written: start the run again"
                raise RunError(f"the learner died before the final evaluation ({e}); {then}") from None
            self.evals.append((self.step, final["eval/task_score"]))
            self._emit(self.step, final)
        path = self._last_checkpoint("final", rl_seconds)
        summary = self._summary(rl_seconds, str(path))
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if progress:
            self.log(progress.summary({k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in summary.items()}))
        self._close_log()
        return summary

    # ---- evaluation off the critical path (streaming) -------------------------------------------------------
    _eval_job: _BackgroundEval | None = None

    def _start_eval(self) -> None:
        """Start a held-out evaluation of this step in a driver thread; the loop goes on. Its requests queue on
        the actors between generate chunks (the fleet's idle time when the learner is the bound) and run with
        the weights the actors hold then: this step's version, or one newer if it was swapped in meanwhile."""
        if self._eval_job is not None:  # one at a time: this step is not evaluated
            self.log(f"step {self.step}: the evaluation of step {self._eval_job.step} is still running; skipping "
                     "this one (raise train.eval_every)")
            return
        self._eval_job = _BackgroundEval(self.evaluate, self.step)

    def _finish_eval(self, wait: bool) -> dict[str, float]:
        """Log a finished background evaluation at the step it evaluated (``wait``: wait for it). Returns its
        held-out score, for the progress line."""
        job = self._eval_job
        if job is None or not (wait or job.done()):
            return {}
        job.thread.join()
        self._eval_job = None
        if isinstance(job.error, WeightsLost):  # the learner died under it: that step goes unevaluated
            self.log(f"the evaluation of step {job.step} did not run ({job.error})")
            return {}
        if job.error is not None:
            raise job.error
        self.evals.append((job.step, job.result["eval/task_score"]))
        self._emit(job.step, {**job.result, "eval/lag_steps": float(self.step - job.step)})
        return {"eval/task_score": job.result["eval/task_score"]}

    def _step(self) -> dict[str, float]:
        """One on-policy step: sample the batch, score it, train, publish, every actor loads (in order, so
        deterministic mode is exact), and the next step's batch is launched right behind the loads. Streaming
        (``max_staleness`` >= 1) is ``_stream_step``."""
        if self.stream is not None:
            return self._stream_step()
        t0 = time.perf_counter()
        version = max(self.store.latest_version, self.fleet.start_version)
        if not self.inflight:
            self.inflight.append(self.launch(self.step + 1, version))
        _, launched = self.inflight[0]
        rollouts, gen_seconds = self.fleet.collect(launched)
        metrics = self.rollout_stats(rollouts, gen_seconds, max(version, 0))
        scored, reward_stats = self.score(rollouts)
        metrics.update(reward_stats)
        if self.cfg.algorithm.dynamic_sampling:
            scored, metrics["rollout/extra_prompts"] = self._dynamic_sampling(scored, self.step + 1)
        metrics.update(self._learner_call(self.learner.train_step, scored))
        self.inflight.popleft()  # trained: from here on it is never redone
        self.step += 1
        metrics.update(self.sync(launch_next=self.step < self.cfg.train.steps))
        metrics.update(self.fleet.take_counts())
        self.fleet.grow()
        metrics["system/step_seconds"] = time.perf_counter() - t0
        return metrics

    def _stream_step(self) -> dict[str, float]:
        """One streaming step: take a step's worth of groups from the buffer (waiting only if it holds fewer),
        train on them while the stream keeps sampling and scoring, publish, and let the actors fetch the new
        version in the background. Every rollout carries its policy_version; the sampler's logprobs feed the
        rollout correction (TIS by default)."""
        t0 = time.perf_counter()
        version = max(self.store.latest_version, self.fleet.start_version)
        groups, metrics = self.stream.take(self.cfg.train.prompts_per_step, version, self.cfg.generation.timeout_s)
        if self.cfg.algorithm.dynamic_sampling:
            metrics["rollout/extra_prompts"] = metrics.get("rollout/filtered_total{reason=uniform}", 0.0)
        call = self._learner_call(self.learner.train_step_async, [s for g in groups for s in g.samples])
        publishing = self._learner_call(self.learner.publish_async)  # runs right after the step, on the learner
        while len(ray.wait(call.refs, num_returns=len(call.refs), timeout=0)[0]) < len(call.refs) \
                and time.monotonic() < call.deadline:
            self.stream.pump(timeout=1.0, also=call.refs)  # sample and score while the learner trains
        metrics.update(self._learner_call(call.results)[0])  # a failed step raises here, before its publish
        self.step += 1
        started = time.perf_counter()
        publishing.deadline = time.monotonic() + publishing.timeout_s  # its own limit, from the step's end
        version, ref, stats = self._publish(publishing)
        self.fleet.stage(version, ref)  # hidden sync: fetched beside generation, swapped between requests
        metrics.update(stats)
        metrics["sync/seconds"] = time.perf_counter() - started
        metrics.update(self.fleet.take_counts())
        self.fleet.grow()
        metrics["system/step_seconds"] = time.perf_counter() - t0
        return metrics

    def _dynamic_sampling(self, scored: list[ScoredRollout], step: int) -> tuple[list[ScoredRollout], float]:
        """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, sec. 3.2): groups whose rewards are all
        equal give no gradient under a group baseline, so draw more prompts, a batch at a time, until
        ``train.prompts_per_step`` groups differ or ``algorithm.max_extra_prompts_per_step`` extra prompts were
        drawn; train on the first ``prompts_per_step`` informative groups. Returns them and the extra count."""
        want, cap = self.cfg.train.prompts_per_step, self.cfg.algorithm.max_extra_prompts_per_step
        buffer = RolloutBuffer(capacity=want + cap, max_staleness=0, filters=("uniform",))
        buffer.add(_groups(scored))
        extra, next_group = 0, max((s.rollout.group_id for s in scored), default=-1) + 1
        while len(buffer) < want and extra < cap:
            _, prompts = self.next_prompts(min(want, cap - extra), first_group=next_group)
            seeds = [sampling_seed(self.cfg.train.seed, step, p.index) for p in prompts] \
                if self.cfg.train.deterministic else None
            more, _ = self.score(self.fleet.generate(prompts, seeds=seeds)[0])
            extra, next_group = extra + len(prompts), next_group + len(prompts)
            buffer.add(_groups(more))
        kept = sorted(buffer.groups, key=lambda g: g.prompt_index)[:want]
        return [s for g in kept for s in g.samples], float(extra)

    def _open_log(self, offset: int | None = None) -> None:
        """Open metrics.jsonl for appending, cut back to ``offset`` (a resume: the log as of the checkpoint)."""
        path = self.run_dir / "metrics.jsonl"
        offset = self._metrics_offset if offset is None else offset
        if offset is not None and path.exists():
            with path.open("r+b") as f:
                f.truncate(offset)
        self.logger = JsonlLogger(path) if self.cfg.metrics.jsonl else None
        if self.reporters is None:  # TensorBoard / W&B / MLflow (metrics.report_to), once per process
            from core.report import RunReporters

            self.reporters = RunReporters(self.cfg.metrics.report_to, self.run_dir, self.cfg.model_dump(mode="json"),
                                          resumed_at=self.step if self.resume_from is not None else None)

    reporters = None

    def _close_log(self) -> None:
        for out in (self.logger, self.reporters):
            if out is not None:
                out.close()

    def _emit(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger:
            self.logger.write(step, metrics)
        if self.reporters is not None:
            self.reporters.write(step, metrics)
        if self.sink:
            self.sink.log({k: v for k, v in metrics.items() if _driver_exports(k)})
            for slot, v in self.fleet.versions.items():
                self.sink.log({"sync/policy_version": float(v)}, tags={"actor_id": str(slot)})
            self.sink.heartbeat()

    def _summary(self, seconds: float, ckpt: str, interrupted: str | None = None) -> dict:
        evals = self.evals
        last3 = [s for _, s in evals[-3:]]
        start_score = evals[0][1]
        out = {
            "steps": self.step,
            "rl_seconds": round(seconds, 1),
            "eval_start": start_score,
            "eval_final": evals[-1][1],
            "eval_last3_mean": sum(last3) / len(last3),
            "eval_gain_points": 100 * (sum(last3) / len(last3) - start_score),
            "eval_best": max(s for _, s in evals),
            "actor_restarts": self.fleet.restarts,
            "fleet_size": len(self.fleet.live),
            "learner_restores": self.learner_restores,
            "checkpoint": ckpt,
        }
        if interrupted:
            out["interrupted"] = interrupted
        return out

    def shutdown(self, stop_serve: bool = True) -> None:
        """Delete the reward apps; ``stop_serve``: stop Serve too when no other app is left (``RewardClient``)."""
        for client in (self.eval_reward, getattr(self, "reward", None)):  # start() may have stopped before either
            try:
                if client is not None:
                    client.shutdown(stop_serve)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass


def _groups(scored: list[ScoredRollout]) -> list[Group]:
    """Scored rollouts as groups, by group id (the prompt's position in its batch)."""
    return [Group(gid, samples) for gid, samples in by_group(scored).items()]


class _BackgroundEval:
    """A held-out evaluation of step ``step`` running in a driver thread."""

    def __init__(self, evaluate, step: int):
        self.step, self.result, self.error = step, None, None
        self.thread = threading.Thread(target=self._run, args=(evaluate,), name=f"relay-eval-{step}", daemon=True)
        self.thread.start()

    def _run(self, evaluate) -> None:
        try:
            self.result = evaluate()
        except BaseException as e:  # noqa: BLE001 - raised in the loop's thread by _finish_eval
            self.error = e

    def done(self) -> bool:
        return not self.thread.is_alive()


def sampling_seed(seed: int, step: int, group: int) -> int:
    """The sampling seed of prompt ``group`` at ``step`` in deterministic mode: a hash of the three, so seeds
    never repeat across steps (vLLM seeds sample i of a request with seed + i; 2^31 apart makes those clash
    only by chance)."""
    digest = hashlib.blake2b(f"{seed}:{step}:{group}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


# Exported to Prometheus by the component that measures them, with its own labels.
_EXPORTED_ELSEWHERE = ("learner/", "rollout/generated_tokens_total", "rollout/generation_seconds", "sync/swap_seconds")


def _driver_exports(key: str) -> bool:
    from core.metrics import METRICS, split_key

    return split_key(key)[0] in METRICS and not key.startswith(_EXPORTED_ELSEWHERE)
