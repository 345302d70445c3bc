"""Pure combination math of the reward service: validation, weighting, exclusion, normalisation, clipping.

No Ray, no torch: the ingress deployment calls these, and unit tests check them by hand.
Order per sample: weighted sum of source rewards -> exclude if any source failed or gave NaN/inf
-> running normalisation (optional) -> clip (optional).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from reward_service.records import RewardRequest, RewardResult, SourceScore, describe


def validate_request(obj: object) -> RewardRequest | str:
    """A well-formed ``RewardRequest``, or a message saying what is wrong with ``obj``.

    Accepts a ``RewardRequest`` or a dict with ``prompt`` (a non-empty string), ``response`` (a string,
    possibly empty), an optional ``metadata`` dict of strings and an optional ``response_tokens`` (an int
    >= 0, or null); the HTTP route sends dicts.
    """
    if isinstance(obj, RewardRequest):
        fields = {"prompt": obj.prompt, "response": obj.response, "metadata": obj.metadata,
                  "response_tokens": obj.response_tokens}
    elif isinstance(obj, Mapping):
        missing = [k for k in ("prompt", "response") if k not in obj]
        if missing:
            return f"bad request: missing field(s) {missing} in {_quote(obj)}"
        unknown = sorted(set(obj) - set(_REQUEST_FIELDS))
        if unknown:
            return f"bad request: unknown field(s) {unknown}; allowed: {', '.join(_REQUEST_FIELDS)}"
        fields = {"prompt": obj["prompt"], "response": obj["response"], "metadata": obj.get("metadata", {}),
                  "response_tokens": obj.get("response_tokens")}
    else:
        return f"bad request: expected a RewardRequest or a dict, got {type(obj).__name__}: {_quote(obj)}"
    for key in ("prompt", "response"):
        if not isinstance(fields[key], str):
            return f"bad request: {key} must be a string, got {type(fields[key]).__name__}: {_quote(fields[key])}"
    # An empty response is a legitimate (wrong) answer of the policy and is scored; an empty
    # prompt is a malformed request.
    if not fields["prompt"].strip():
        return f"bad request: prompt is empty in {_quote(obj)}"
    meta = fields["metadata"]
    if meta is None:
        meta = {}
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        return f"bad request: metadata must be a dict of strings to strings, got {_quote(meta)}"
    tokens = fields["response_tokens"]
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
        return f"bad request: response_tokens must be an int >= 0 or null, got {_quote(tokens)}"
    return RewardRequest(fields["prompt"], fields["response"], dict(meta), tokens)


_REQUEST_FIELDS = ("prompt", "response", "metadata", "response_tokens")


def combine(req: RewardRequest, scores: Mapping[str, SourceScore],
            weights: Mapping[str, float]) -> tuple[float | None, dict[str, float], str | None, bool]:
    """Weighted sum of the sources' rewards for one sample.

    Returns (reward, components, error, non_finite). ``reward`` is None when a source failed
    (``error`` says which) or returned NaN/inf (``non_finite`` is True); components keep every
    finite number reported, keyed by source name (extras as ``name/extra``).
    """
    components: dict[str, float] = {}
    errors: list[str] = []
    bad: list[str] = []
    total = 0.0
    for name, score in scores.items():
        if score.error is not None:
            errors.append(f"source {name!r}: {score.error}")
            continue
        for key, val in score.extras.items():
            if math.isfinite(val):
                components[f"{name}/{key}"] = val
        if score.value is None or not math.isfinite(score.value):
            bad.append(f"{name}={score.value}")
            continue
        components[name] = score.value
        total += weights[name] * score.value
    if errors:
        return None, components, "; ".join(errors) + f" {describe(req)}", False
    if bad:
        return None, components, f"non-finite reward excluded: {', '.join(bad)} {describe(req)}", True
    if not math.isfinite(total):
        return None, components, f"non-finite combined reward {total} excluded {describe(req)}", True
    return total, components, None, False


def clip(value: float, bounds: tuple[float, float] | None) -> float:
    if bounds is None:
        return value
    return min(max(value, bounds[0]), bounds[1])


@dataclass
class RunningNorm:
    """Running mean/std of the combined reward (Welford), for ``normalize: true``.

    Each batch first updates the statistics, then is standardised by them, so the very first batch
    is already centred. Until two samples are seen the std is taken as 1.
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def update(self, values: list[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count >= 2 else 1.0

    def apply(self, value: float) -> float:
        return (value - self.mean) / (self.std + 1e-8)


def finish(results: list[tuple[float | None, dict[str, float], str | None]], norm: RunningNorm | None,
           bounds: tuple[float, float] | None) -> list[RewardResult]:
    """Normalise (if ``norm``) and clip the combined rewards of one batch."""
    if norm is not None:
        norm.update([r for r, _, _ in results if r is not None])
    out = []
    for reward, components, error in results:
        if reward is not None:
            reward = clip(norm.apply(reward) if norm is not None else reward, bounds)
        out.append(RewardResult(reward, components, error))
    return out


def _quote(obj: object, limit: int = 120) -> str:
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."
