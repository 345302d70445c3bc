"""Rule rewards, registered by name: thin wrappers over the pure functions in ``verifiers.py``.

A rule is ``fn(req: RewardRequest, **params) -> float``. It raises ``ValueError`` when the request lacks what it
needs, naming the missing piece; the scorer turns that into an error for that sample only. ``RULES`` maps each
name to a ``Rule`` that lists the parameters it accepts with their defaults; ``check_params`` validates a
source's params against it (the config validator calls it, so this module imports no heavy library).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from core import data
from reward_service.records import RewardRequest
from reward_service.verifiers import (
    extract_final_answer,
    extract_gold_answer,
    matches_format,
    math_equivalent,
    overlong_penalty,
    tags_regex,
)

LENGTH_BUDGET_CHARS = 8
"""default response length (stripped characters) above which ``length_penalty`` starts to bite"""


class _Required:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()
"""the default of a parameter that a source must set"""


@dataclass(frozen=True)
class Rule:
    """A registered rule: the function, the parameters it accepts, and what it scores."""

    fn: Callable[..., float]
    """``fn(req, **params) -> float``"""
    doc: str
    """one line for listings and error messages"""
    params: dict[str, object] = field(default_factory=dict)
    """accepted parameter names with their defaults (``REQUIRED`` where there is none)"""
    check: Callable[[dict[str, object]], None] | None = None
    """raises ValueError on a bad combination of values; called by ``check_params``"""


def _answer(req: RewardRequest, rule: str) -> str:
    if "answer" not in req.metadata:
        raise ValueError(f"rule {rule!r} needs metadata['answer']")
    return req.metadata["answer"]


def exact_match(req: RewardRequest) -> float:
    """1.0 if the stripped response equals the stripped ``metadata["answer"]`` (``core.data.exact_match``)."""
    return 1.0 if data.exact_match(req.response, _answer(req, "exact_match")) else 0.0


def math_answer(req: RewardRequest) -> float:
    """1.0 if the response's final answer equals ``metadata["answer"]`` mathematically, else 0.0.

    See ``verifiers.extract_final_answer`` / ``extract_gold_answer`` for what counts as the final answer.
    """
    gold = extract_gold_answer(_answer(req, "math"))
    if not gold:
        raise ValueError("rule 'math' needs a non-empty metadata['answer']")
    pred = extract_final_answer(req.response)
    return 1.0 if pred is not None and math_equivalent(pred, gold) else 0.0


def well_formed(req: RewardRequest, pattern: str | None = None, tags: list[str] | None = None) -> float:
    """1.0 if the response has the required shape (``verifiers.matches_format``), else 0.0."""
    return 1.0 if matches_format(req.response, pattern, tags) else 0.0


def integer(req: RewardRequest) -> float:
    """1.0 if the response is a single integer (surrounding whitespace allowed), else 0.0."""
    return well_formed(req)


def length_penalty(req: RewardRequest) -> float:
    """In [-1, 0]: minus the fraction by which the stripped response exceeds its budget.

    The budget is ``len(metadata["answer"])`` when an answer is given, else ``metadata["max_chars"]``,
    else ``LENGTH_BUDGET_CHARS``; the penalty reaches -1 at twice the budget.
    """
    if "answer" in req.metadata:
        budget = max(1, len(req.metadata["answer"].strip()))
    else:
        try:
            budget = int(req.metadata.get("max_chars", LENGTH_BUDGET_CHARS))
        except ValueError:
            raise ValueError(f"metadata['max_chars'] must be an int, got {req.metadata['max_chars']!r}") from None
        if budget < 1:
            raise ValueError(f"metadata['max_chars'] must be positive, got {budget}")
    excess = max(0, len(req.response.strip()) - budget)
    return -min(1.0, excess / budget)


def overlong(req: RewardRequest, max_tokens: int, overlong_buffer: int = 0, penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment on ``req.response_tokens`` (``verifiers.overlong_penalty``), in [-factor, 0]."""
    if req.response_tokens is None:
        raise ValueError("rule 'overlong' needs response_tokens (the sampler's response length) in the request")
    return overlong_penalty(req.response_tokens, max_tokens, overlong_buffer, penalty_factor)


def _check_format(params: dict[str, object]) -> None:
    if params["pattern"] is not None:
        if not isinstance(params["pattern"], str):
            raise ValueError(f"param 'pattern' must be a regex string, got {params['pattern']!r}")
        try:
            re.compile(params["pattern"])
        except re.error as exc:
            raise ValueError(f"param 'pattern' is not a valid regex: {exc}") from None
    if params["tags"] is not None:
        tags_regex(params["tags"])


def _check_overlong(params: dict[str, object]) -> None:
    overlong_penalty(0, params["max_tokens"], params["overlong_buffer"], params["penalty_factor"])


RULES: dict[str, Rule] = {
    "exact_match": Rule(exact_match, "1 if the stripped response equals metadata['answer']"),
    "math": Rule(
        math_answer, "1 if the final answer (boxed, ####, or last number) equals metadata['answer'] (math-verify)"
    ),
    "format": Rule(
        well_formed,
        "1 if the stripped response fullmatches `pattern` and/or is the `tags` blocks in order; default: an integer",
        params={"pattern": None, "tags": None},
        check=_check_format,
    ),
    "integer": Rule(integer, "1 if the response is a single integer"),
    "length_penalty": Rule(length_penalty, "in [-1, 0]: how far the response exceeds its character budget"),
    "overlong": Rule(
        overlong,
        "DAPO soft overlong punishment on response_tokens, in [-penalty_factor, 0]",
        params={"max_tokens": REQUIRED, "overlong_buffer": 0, "penalty_factor": 1.0},
        check=_check_overlong,
    ),
}


def get_rule(name: str) -> Rule:
    """The rule registered as ``name``; unknown names fail listing the valid ones."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; valid rules: {sorted(RULES)}") from None


def check_params(name: str, params: dict[str, object]) -> dict[str, object]:
    """``params`` merged over the rule's defaults; ValueError on an unknown, missing or bad parameter.

    >>> check_params("overlong", {"max_tokens": 4096})
    {'max_tokens': 4096, 'overlong_buffer': 0, 'penalty_factor': 1.0}
    """
    rule = get_rule(name)
    unknown = sorted(set(params) - set(rule.params))
    if unknown:
        allowed = sorted(rule.params) or "none"
        raise ValueError(f"rule {name!r} has no param {unknown[0]!r}; allowed params: {allowed}")
    merged = {**rule.params, **params}
    missing = [key for key, value in merged.items() if value is REQUIRED]
    if missing:
        raise ValueError(f"rule {name!r} needs param {missing[0]!r}")
    if rule.check is not None:
        try:
            rule.check(merged)
        except ValueError as exc:
            raise ValueError(f"rule {name!r}: {exc}") from None
    return merged
