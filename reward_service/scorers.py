"""Source scorers: plain classes that ``app.py`` turns into Serve deployments in one place.

Every scorer has the same small surface: ``async score(requests) -> list[SourceScore]`` (one per
request, in order) and ``stats() -> dict``. Model scorers push each text into a ``serve.batch``
queue, so texts from concurrent calls share forward passes; ``max_batch_size=1`` turns batching off.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import Counter

from ray import serve

from reward_service.config import RewardSourceConfig
from reward_service.records import RewardRequest, SourceScore
from reward_service.rules import get_rule


class RuleScorer:
    """A rule from ``reward_service.rules``; a rule's ValueError becomes that sample's error."""

    def __init__(self, source: RewardSourceConfig):
        self._rule = get_rule(source.rule)
        self._calls = 0
        self._errors = 0

    async def score(self, requests: list[RewardRequest]) -> list[SourceScore]:
        self._calls += 1
        out = []
        for req in requests:
            try:
                out.append(SourceScore(float(self._rule(req))))
            except ValueError as exc:
                self._errors += 1
                out.append(SourceScore(None, error=str(exc)))  # the combiner quotes the sample
        return out

    def stats(self) -> dict:
        return {"calls": self._calls, "errors": self._errors, "pid": os.getpid()}


class _BatchedScorer:
    """Shared batching and counters; subclasses implement ``_forward(texts) -> (scores, n_truncated)``."""

    def __init__(self, source: RewardSourceConfig):
        import torch

        torch.set_num_threads(max(1, round(source.num_cpus)))
        self._batch_sizes: Counter[int] = Counter()
        self._truncated = 0
        self._device = "cuda" if source.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self._score_text.set_max_batch_size(source.max_batch_size)
        self._score_text.set_batch_wait_timeout_s(source.batch_wait_timeout_s)

    async def score(self, requests: list[RewardRequest]) -> list[SourceScore]:
        from reward_service.models import join_text

        return list(await asyncio.gather(*(self._score_text(join_text(r.prompt, r.response)) for r in requests)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # real values are set in __init__ from config
    async def _score_text(self, texts: list[str]) -> list[SourceScore]:
        self._batch_sizes[len(texts)] += 1
        # Blocking on purpose: Serve runs user code on its own event-loop thread, so requests keep arriving
        # meanwhile. Measured with 64 callers, a forward in asyncio.to_thread fought that loop for the GIL
        # and halved the mean batch (17 vs 27) and throughput.
        scores, truncated = self._forward(texts)
        self._truncated += truncated
        return scores

    def _forward(self, texts: list[str]) -> tuple[list[SourceScore], int]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {
            "batches": sum(self._batch_sizes.values()),
            "items": sum(n * c for n, c in self._batch_sizes.items()),
            "max_batch_size_seen": max(self._batch_sizes, default=0),
            "batch_sizes": dict(self._batch_sizes),
            "truncated": self._truncated,
            "pid": os.getpid(),
        }


class ModelScorer(_BatchedScorer):
    """One scalar-head reward model loaded from a checkpoint directory."""

    def __init__(self, source: RewardSourceConfig):
        from reward_service.models import RewardModel

        super().__init__(source)
        self._model = RewardModel.from_pretrained(source.model_path, source.pooling, source.max_length)
        self._model.eval().to(self._device)

    def _forward(self, texts: list[str]) -> tuple[list[SourceScore], int]:
        values, truncated = self._model.score(texts)
        return [SourceScore(v) for v in values], truncated


class RewardEnsemble(_BatchedScorer):
    """Several reward models on the same texts: reward = mean - uncertainty_penalty * std.

    std is the population std over the K models (ddof=0), so two models scoring a and b give
    mean (a+b)/2 and std |a-b|/2. If any model returns NaN/inf the sample's reward is NaN and
    the combiner excludes it.
    """

    def __init__(self, source: RewardSourceConfig):
        from reward_service.models import RewardModel

        super().__init__(source)
        self._models = [RewardModel.from_pretrained(p, source.pooling, source.max_length).eval().to(self._device)
                        for p in source.model_paths]
        self._penalty = source.uncertainty_penalty

    def _forward(self, texts: list[str]) -> tuple[list[SourceScore], int]:
        per_model = []
        truncated = 0
        for model in self._models:
            values, n = model.score(texts)
            per_model.append(values)
            truncated = max(truncated, n)
        out = []
        for values in zip(*per_model, strict=True):  # (K,) for one text
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            out.append(SourceScore(mean - self._penalty * std, {"mean": mean, "std": std}))
        return out, truncated
