"""Records that cross the reward service's boundaries (see DESIGN.md, "Records").

``RewardRequest`` goes in (from the driver or over HTTP), ``RewardResult`` comes out.
``SourceScore`` is what one source deployment hands back to the combiner for one request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardRequest:
    """One (prompt, response) pair to score."""

    prompt: str
    response: str
    metadata: dict[str, str] = field(default_factory=dict)
    """task metadata, e.g. {"answer": "81"} for the exact-match rule; the data layer JSON-encodes non-string
    columns (e.g. a list of tests for a code source)"""
    response_tokens: int | None = None
    """length of the response in tokens, from the sampler (the ``overlong`` rule needs it); None = unknown"""


@dataclass(frozen=True)
class RewardResult:
    """The combined reward for one request.

    ``reward is None`` means the sample is excluded from training: a source returned NaN/inf,
    or the request was malformed, or a source failed on it; ``error`` then says why and
    quotes the offending sample.
    """

    reward: float | None
    components: dict[str, float] = field(default_factory=dict)
    """per-source rewards before weighting, e.g. {"exact_match": 1.0, "rm": 0.31, "rm/std": 0.05}"""
    error: str | None = None


@dataclass(frozen=True)
class SourceScore:
    """One source's score for one request (internal: source deployment -> combiner)."""

    value: float | None
    """the source's reward; None when ``error`` is set"""
    extras: dict[str, float] = field(default_factory=dict)
    """additional named numbers reported as components, e.g. {"std": 0.1} for an ensemble"""
    error: str | None = None


def describe(req: RewardRequest, limit: int = 80) -> str:
    """A short quote of a sample for error messages."""
    return f"(prompt={req.prompt[:limit]!r}, response={req.response[:limit]!r})"
