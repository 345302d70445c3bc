"""The rollout buffer: scored groups wait here between the reward service and the learner.

A group (one prompt's samples) is admitted when it lands, if every admission filter passes it:
``uniform`` (DAPO's dynamic sampling, Yu et al. 2025, arXiv:2503.14476, sec. 3.2) refuses a group
whose rewards are all equal, since a group baseline gives it no gradient. ``take`` hands the learner
the oldest groups first and drops, counted, any group older than ``max_staleness`` versions behind
the learner; the learner never trains on a rollout older than allowed. The buffer is bounded: the
stream that fills it asks ``room`` before launching more prompts.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from core.records import ScoredRollout


@dataclass(frozen=True)
class Group:
    """A prompt's scored samples, admitted together."""

    prompt_index: int
    """the prompt's position in the training set (put back in the order on a checkpoint)"""
    samples: list[ScoredRollout]

    @property
    def version(self) -> int:
        """The oldest policy version among the samples."""
        return min(s.rollout.policy_version for s in self.samples)


def informative(group: Group) -> bool:
    """The ``uniform`` filter: the rewards differ, so a group baseline leaves a signal."""
    return len({s.reward for s in group.samples}) > 1


def by_group(scored: list[ScoredRollout]) -> dict[int, list[ScoredRollout]]:
    """Scored rollouts by group id, in order of first appearance."""
    out: dict[int, list[ScoredRollout]] = {}
    for s in scored:
        out.setdefault(s.rollout.group_id, []).append(s)
    return out


FILTERS: dict[str, Callable[[Group], bool]] = {"uniform": informative}
"""admission filters by name: a group is admitted only if each returns True"""


class RolloutBuffer:
    def __init__(self, capacity: int, max_staleness: int, filters: tuple[str, ...] = ()):
        """``capacity``: groups held at most (the stream stops launching when full); ``filters``: names in
        FILTERS."""
        unknown = [f for f in filters if f not in FILTERS]
        if unknown:
            raise ValueError(f"unknown admission filter(s) {unknown}; valid: {sorted(FILTERS)}")
        self.capacity, self.max_staleness, self.filters = capacity, max_staleness, filters
        self.groups: deque[Group] = deque()
        self.filtered: dict[str, int] = {}  # groups refused, by filter, since the last take_counts()
        self.stale = 0  # rollouts dropped as too old, since the last take_counts()

    def __len__(self) -> int:
        return len(self.groups)

    def room(self) -> int:
        return max(0, self.capacity - len(self.groups))

    def add(self, groups: list[Group]) -> int:
        """Admit the groups that pass every filter, in order; returns how many were admitted."""
        admitted = 0
        for group in groups:
            refused = next((name for name in self.filters if not FILTERS[name](group)), None)
            if refused is not None:
                self.filtered[refused] = self.filtered.get(refused, 0) + 1
                continue
            self.groups.append(group)
            admitted += 1
        return admitted

    def drop_stale(self, learner_version: int) -> None:
        """Drop groups older than ``max_staleness`` versions behind ``learner_version``; counted."""
        fresh = deque(g for g in self.groups if learner_version - g.version <= self.max_staleness)
        self.stale += sum(len(g.samples) for g in self.groups) - sum(len(g.samples) for g in fresh)
        self.groups = fresh

    def ready(self, n: int, learner_version: int) -> bool:
        self.drop_stale(learner_version)
        return len(self.groups) >= n

    def take(self, n: int, learner_version: int) -> list[Group]:
        """The ``n`` oldest admitted groups within the staleness bound (fewer if it holds fewer)."""
        self.drop_stale(learner_version)
        return [self.groups.popleft() for _ in range(min(n, len(self.groups)))]

    def clear(self) -> list[Group]:
        """Empty the buffer (a learner restored from a checkpoint); returns what it held."""
        held, self.groups = list(self.groups), deque()
        return held

    def take_counts(self) -> dict[str, float]:
        """Groups refused by filter and rollouts dropped as stale since the last call, and the queue depth."""
        out = {f"rollout/filtered_total{{reason={name}}}": float(v) for name, v in self.filtered.items()}
        if self.stale:
            out["rollout/dropped_total{reason=stale}"] = float(self.stale)
        out["rollout/queue_depth"] = float(len(self.groups))
        self.filtered, self.stale = {}, 0
        return out
