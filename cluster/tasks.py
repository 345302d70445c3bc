"""The embedded task: addition with a checkable answer.

A prompt is ``"23+58="`` and the correct response is ``"81"`` followed by end-of-sequence.
Train and held-out sets are generated from a seed and never overlap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TaskConfig(BaseModel):
    """The embedded task. SFT, RL and evaluation all draw their splits from this one config."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["addition"] = Field("addition", description="the embedded task with a checkable answer")
    digits: int = Field(2, ge=1, le=6, description="digits of each operand")
    n_train: int = Field(7600, ge=1, description="training prompts generated from the seed (7600 + 500 = all "
                         "8100 two-digit problems; with 4000 the SFT memorised its prompts and RL did not generalise)")
    n_eval: int = Field(500, ge=1, description="held-out prompts, disjoint from the training ones")
    seed: int = Field(0, description="seed of the prompt sets")

    def problems(self) -> tuple[list[Problem], list[Problem]]:
        """(train, held-out): the same call everywhere, so held-out never leaks into training."""
        return make_problems(self.n_train, self.n_eval, digits=self.digits, seed=self.seed)


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
