"""Source scorers: plain classes that ``app.py`` turns into Serve deployments in one place.

Every scorer has the same small surface: ``async score(requests) -> list[SourceScore]`` (one per
request, in order) and ``stats() -> dict``. Model scorers push each text into a ``serve.batch``
queue, so texts from concurrent calls share forward passes; ``max_batch_size=1`` turns batching off.
Function and code scorers run the user's function / the sandbox in threads (``_Calls``), so a slow
call does not hold up the replica's event loop, and other calls keep being served meanwhile.

Simplifications: a user function past its timeout is abandoned, not stopped (a Python thread cannot be
killed), so a function that can loop forever belongs in the code sandbox, which kills its processes; a
function file is shipped alone, so it can import installed packages but not files beside it (use the
``package.module:name`` form for multi-file reward code).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import importlib
import linecache
import math
import numbers
import os
import sys
import threading
import types
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ray import serve

from reward_service.config import FunctionRef, RewardSourceConfig
from reward_service.records import RewardRequest, SourceScore
from reward_service.rules import check_params, get_rule


class RuleScorer:
    """A rule from ``reward_service.rules`` with the source's params; a rule's ValueError becomes that
    sample's error."""

    def __init__(self, source: RewardSourceConfig):
        self._rule = get_rule(source.rule)
        self._params = check_params(source.rule, source.params)
        self._calls = 0
        self._errors = 0

    async def score(self, requests: list[RewardRequest]) -> list[SourceScore]:
        return self.score_now(requests)

    def score_now(self, requests: list[RewardRequest]) -> list[SourceScore]:
        """``score`` without the coroutine: what the ingress calls for an inline rule."""
        self._calls += 1
        out = []
        for req in requests:
            try:
                out.append(SourceScore(float(self._rule.fn(req, **self._params))))
            except ValueError as exc:
                self._errors += 1
                out.append(SourceScore(None, error=str(exc)))  # the combiner quotes the sample
        return out

    def stats(self) -> dict:
        return {"calls": self._calls, "errors": self._errors, "pid": os.getpid()}


class CallTimeout(TimeoutError):
    """A call run by ``_Calls`` did not return within its timeout."""


class _Calls:
    """Blocking calls in daemon threads, off the replica's event loop: at most ``size`` at once, each
    abandoned after ``timeout_s`` (None = no limit).

    A Python thread cannot be killed: an abandoned call keeps running in its thread until it returns
    (counted in ``abandoned``), but it gives up its slot, so later calls are not stuck behind it, and its
    thread, being a daemon, does not keep the replica's process alive.
    """

    def __init__(self, size: int, timeout_s: float | None):
        self._slots = asyncio.Semaphore(size)
        self._timeout_s = timeout_s
        self.abandoned = 0

    async def run(self, call: Callable[[], Any]) -> Any:
        """``call()``'s result; raises what it raises, or ``CallTimeout`` past ``timeout_s``."""
        async with self._slots:
            future: Future = Future()
            threading.Thread(target=_resolve, args=(future, call), daemon=True, name="relay-reward-call").start()
            try:
                return await asyncio.wait_for(asyncio.wrap_future(future), self._timeout_s)
            except asyncio.TimeoutError:
                self.abandoned += 1
                raise CallTimeout(f"no result within timeout_s={self._timeout_s:g}s") from None


def _resolve(future: Future, call: Callable[[], Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(call())
    except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
        future.set_exception(exc)


def load_function(ref: str, file_text: str | None = None) -> Callable:
    """The callable ``ref`` (``/abs/file.py:name`` or ``package.module:name``) names, loaded in this process.

    ``file_text`` is the file's text as read at deploy time (``app.build_app``); the file itself is read
    only without it. Raises ImportError naming the file or module and the cause.
    """
    parsed = FunctionRef.parse(ref)
    try:
        if parsed.is_file:
            path = Path(parsed.target)
            module = _exec_file(path, path.read_text() if file_text is None else file_text)
        else:
            module = importlib.import_module(parsed.target)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported the same way
        raise ImportError(f"reward function {ref}: cannot import {parsed.target}: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, parsed.name, None)
    if not callable(fn):
        found = "nothing" if fn is None else type(fn).__name__
        raise ImportError(f"reward function {ref}: {parsed.target} has no function {parsed.name!r} (found {found})")
    return fn


def _exec_file(path: Path, text: str) -> types.ModuleType:
    """Run ``text`` as the module of file ``path``, as an import of it would."""
    # A name of our own, so the file cannot clash with a module of the same name already imported here;
    # in sys.modules while it runs, as on import (dataclasses and pickle look it up there).
    module = types.ModuleType(f"relay_reward_fn_{path.stem}")
    module.__file__ = str(path)
    # Tracebacks quote the deployed text, on nodes without the file too (mtime None: never re-read from disk).
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    sys.modules[module.__name__] = module
    try:
        exec(compile(text, str(path), "exec"), module.__dict__)
    except BaseException:
        del sys.modules[module.__name__]
        raise
    return module


class FunctionScorer:
    """The user's function (kind=function), imported when the replica starts; see ``config`` for the signatures.

    A raise, a non-number, a NaN/inf, or a call past ``timeout_s`` becomes an error for the sample(s) of that
    call, never a failed source call: the step goes on without them.
    """

    def __init__(self, source: RewardSourceConfig, file_text: str | None = None):
        self._fn = load_function(source.function, file_text)
        self._text_sha256 = hashlib.sha256(file_text.encode()).hexdigest() if file_text is not None else None
        self._ref = source.function
        self._batched = source.batched
        self._calls = _Calls(source.concurrency, source.timeout_s)
        self._counts: Counter[str] = Counter()

    async def score(self, requests: list[RewardRequest]) -> list[SourceScore]:
        self._counts["calls"] += 1
        self._counts["samples"] += len(requests)
        if self._batched:
            out = await self._score_batch(requests)
        else:
            out = list(await asyncio.gather(*(self._score_one(r) for r in requests)))
        self._counts["errors"] += sum(s.error is not None for s in out)
        return out

    async def _score_one(self, req: RewardRequest) -> SourceScore:
        try:
            value = await self._calls.run(functools.partial(self._fn, req.prompt, req.response, **req.metadata))
        except Exception as exc:  # noqa: BLE001 - the user's error becomes this sample's error
            return SourceScore(None, error=self._failed(exc))
        return _as_score(value, self._ref)

    async def _score_batch(self, requests: list[RewardRequest]) -> list[SourceScore]:
        call = functools.partial(self._fn, [r.prompt for r in requests], [r.response for r in requests],
                                 [dict(r.metadata) for r in requests])
        try:
            values = list(await self._calls.run(call))
        except Exception as exc:  # noqa: BLE001 - the user's error becomes an error of every sample
            return [SourceScore(None, error=self._failed(exc))] * len(requests)
        if len(values) != len(requests):
            error = f"function {self._ref} returned {len(values)} values for {len(requests)} samples"
            return [SourceScore(None, error=error)] * len(requests)
        return [_as_score(v, self._ref) for v in values]

    def _failed(self, exc: Exception) -> str:
        if isinstance(exc, CallTimeout):
            self._counts["timeouts"] += 1
            return f"function {self._ref} timed out: {exc}"
        return f"function {self._ref} raised {type(exc).__name__}: {exc}"

    def stats(self) -> dict:
        return {**{k: self._counts[k] for k in ("calls", "samples", "errors", "timeouts")},
                "abandoned_threads": self._calls.abandoned,
                "file_sha256": self._text_sha256,
                "pid": os.getpid()}


def _as_score(value: object, ref: str) -> SourceScore:
    if not isinstance(value, numbers.Real):
        return SourceScore(None, error=f"function {ref} returned {type(value).__name__} {value!r:.80}, not a number")
    if not math.isfinite(value):
        return SourceScore(None, error=f"function {ref} returned {value}, not a finite number")
    return SourceScore(float(value))


class CodeScorer:
    """Runs the response's code against the sample's tests in ``reward_service.sandbox``; reward = the
    fraction of tests passed. Why each run ended (``SandboxResult.reason``) is counted in ``stats()``."""

    def __init__(self, source: RewardSourceConfig):
        from reward_service import sandbox  # only code replicas need it

        spec = source.sandbox
        self._sandbox = sandbox.Sandbox(sandbox.SandboxLimits(**spec.model_dump(exclude={"user"})), user=spec.user)
        self._extract_code = sandbox.extract_code
        self._parse_tests = sandbox.parse_tests
        self._field = source.tests_field
        self._calls = _Calls(source.concurrency, None)  # the sandbox kills its own runs at wall_seconds
        self._counts: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()

    async def score(self, requests: list[RewardRequest]) -> list[SourceScore]:
        self._counts["calls"] += 1
        self._counts["samples"] += len(requests)
        out = list(await asyncio.gather(*(self._score_one(r) for r in requests)))
        self._counts["errors"] += sum(s.error is not None for s in out)
        return out

    async def _score_one(self, req: RewardRequest) -> SourceScore:
        if self._field not in req.metadata:
            return SourceScore(None, error=f"kind=code needs the tests in metadata[{self._field!r}]")
        try:
            tests = self._parse_tests(req.metadata[self._field])
        except ValueError as exc:
            return SourceScore(None, error=f"metadata[{self._field!r}]: {exc}")
        if not tests:  # a data problem, not a wrong answer: scoring it 0 would train on it
            self._reasons["no_tests"] += 1
            return SourceScore(None, error=f"metadata[{self._field!r}] holds no tests")
        code = self._extract_code(req.response)
        try:
            result = await self._calls.run(functools.partial(self._sandbox.run, code, tests))
        except Exception as exc:  # noqa: BLE001 - a sandbox failure on one sample must not fail the call
            return SourceScore(None, error=f"sandbox failed: {type(exc).__name__}: {exc}")
        self._reasons[result.reason] += 1
        return SourceScore(result.fraction)

    def stats(self) -> dict:
        return {**{k: self._counts[k] for k in ("calls", "samples", "errors")},
                "code_reasons": dict(self._reasons), "pid": os.getpid()}


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
        from reward_service.models import ensemble_reward

        per_model = []
        truncated = 0
        for model in self._models:
            values, n = model.score(texts)
            per_model.append(values)
            truncated = max(truncated, n)
        out = []
        for values in zip(*per_model, strict=True):  # (K,) for one text
            reward, mean, std = ensemble_reward(values, self._penalty)
            out.append(SourceScore(reward, {"mean": mean, "std": std}))
        return out, truncated
