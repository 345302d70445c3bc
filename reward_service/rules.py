"""Rule rewards, registered by name.

A rule is a pure function ``RewardRequest -> float``. It raises ``ValueError`` when the request
lacks what it needs (the combiner turns that into an error result for that sample only).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cluster.tasks import is_correct
from reward_service.records import RewardRequest

RuleFn = Callable[[RewardRequest], float]

_NUMBER = re.compile(r"\s*-?\d+\s*")
LENGTH_BUDGET_CHARS = 8
"""default response length (stripped characters) above which ``length_penalty`` starts to bite"""


def exact_match(req: RewardRequest) -> float:
    """1.0 if the response equals ``metadata["answer"]`` (cluster.tasks.is_correct), else 0.0."""
    if "answer" not in req.metadata:
        raise ValueError("rule 'exact_match' needs metadata['answer']")
    return 1.0 if is_correct(req.response, req.metadata["answer"]) else 0.0


def well_formed(req: RewardRequest) -> float:
    """1.0 if the response is a single integer (surrounding whitespace allowed), else 0.0."""
    return 1.0 if _NUMBER.fullmatch(req.response) else 0.0


def length_penalty(req: RewardRequest) -> float:
    """In [-1, 0]: minus the fraction by which the stripped response exceeds its budget.

    The budget is ``len(metadata["answer"])`` when an answer is given, else ``metadata["max_chars"]``,
    else ``LENGTH_BUDGET_CHARS``; the penalty reaches -1 at twice the budget.
    """
    if "answer" in req.metadata:
        budget = max(1, len(req.metadata["answer"].strip()))
    else:
        budget = int(req.metadata.get("max_chars", LENGTH_BUDGET_CHARS))
    excess = max(0, len(req.response.strip()) - budget)
    return -min(1.0, excess / budget)


RULES: dict[str, RuleFn] = {
    "exact_match": exact_match,
    "format": well_formed,
    "length_penalty": length_penalty,
}


def get_rule(name: str) -> RuleFn:
    """The rule registered as ``name``; unknown names fail listing the valid ones."""
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; valid rules: {sorted(RULES)}") from None
