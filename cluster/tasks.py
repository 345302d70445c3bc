"""The embedded task: addition with a checkable answer.

A prompt is ``"23+58="`` and the correct response is ``"81"`` followed by end-of-sequence.
Train and held-out sets are generated from a seed and never overlap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def make_problems(n_train: int, n_eval: int, digits: int = 2, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Disjoint train and held-out sets of ``a+b=`` problems with ``digits``-digit operands."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    space = (hi - lo + 1) ** 2
    if n_train + n_eval > space:
        raise ValueError(f"task.n_train + task.n_eval = {n_train + n_eval} exceeds the {space} distinct "
                         f"{digits}-digit problems; lower them or raise task.digits")
    rng = random.Random(seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < n_train + n_eval:
        pairs.add((rng.randint(lo, hi), rng.randint(lo, hi)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    problems = [Problem(f"{a}+{b}=", str(a + b)) for a, b in ordered]
    return problems[:n_train], problems[n_train:]


def is_correct(response: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace: the task's true score."""
    return response.strip() == answer.strip()
