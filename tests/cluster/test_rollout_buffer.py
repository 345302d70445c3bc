"""The rollout buffer on hand-made groups: admission filters, the staleness bound, order, counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cluster.rollout_buffer import Group, RolloutBuffer
from cluster.stream import token_staleness
from core.records import Rollout, ScoredRollout


def group(index: int, version: int, rewards: list[float]) -> Group:
    samples = [ScoredRollout(Rollout(index, [1], [2], [-0.5], version, "stop", "p", "r"), r) for r in rewards]
    return Group(index, samples)


def test_uniform_filter_refuses_groups_whose_rewards_are_equal():
    buffer = RolloutBuffer(capacity=10, max_staleness=1, filters=("uniform",))
    assert buffer.add([group(0, 0, [1.0, 1.0]), group(1, 0, [0.0, 1.0]), group(2, 0, [0.0, 0.0])]) == 1
    assert [g.prompt_index for g in buffer.groups] == [1]
    counts = buffer.take_counts()
    assert counts["rollout/filtered_total{reason=uniform}"] == 2.0 and counts["rollout/queue_depth"] == 1.0
    assert "rollout/filtered_total{reason=uniform}" not in buffer.take_counts()  # counts are per call


def test_take_drops_groups_older_than_the_staleness_bound_and_hands_out_the_oldest_first():
    buffer = RolloutBuffer(capacity=10, max_staleness=1)
    buffer.add([group(0, 3, [0, 1]), group(1, 4, [0, 1, 1]), group(2, 5, [1, 0]), group(3, 5, [1, 1])])
    assert not buffer.ready(4, learner_version=5)  # group 0 (version 3) is 2 behind: dropped
    taken = buffer.take(2, learner_version=5)
    assert [g.prompt_index for g in taken] == [1, 2]
    assert all(5 - g.version <= 1 for g in taken)
    counts = buffer.take_counts()
    assert counts["rollout/dropped_total{reason=stale}"] == 2.0  # group 0's two rollouts
    assert counts["rollout/queue_depth"] == 1.0 and len(buffer) == 1


def test_room_and_clear():
    buffer = RolloutBuffer(capacity=3, max_staleness=0)
    buffer.add([group(i, 0, [0, 1]) for i in range(2)])
    assert buffer.room() == 1
    assert [g.prompt_index for g in buffer.clear()] == [0, 1] and buffer.room() == 3


def test_a_group_is_as_old_as_its_oldest_sample():
    mixed = Group(0, group(0, 7, [0.0]).samples + group(0, 6, [1.0]).samples)
    assert mixed.version == 6


def test_unknown_filter_is_named():
    with pytest.raises(ValueError, match="unknown admission filter.*'typo'.*valid: \\['uniform'\\]"):
        RolloutBuffer(capacity=1, max_staleness=0, filters=("typo",))


def test_token_staleness_by_hand():
    def r(versions, version=None, n=None):
        n = len(versions) if n is None else n
        return Rollout(group_id=0, prompt_ids=[1], response_ids=[2] * n, sampling_logprobs=[0.0] * n,
                       policy_version=min(versions) if version is None else version, finish_reason="stop",
                       prompt_text="", response_text="", token_versions=versions)

    # learner at 5: a partial rollout 3,3,4,5 (behind 2,2,1,0) and a whole one at 4 with 2 tokens (1,1)
    out = token_staleness([r([3, 3, 4, 5]), r([], version=4, n=2)], 5)
    assert out["rollout/token_staleness_mean"] == pytest.approx(7 / 6)
    assert out["rollout/mixed_version_fraction"] == pytest.approx(1 / 2)


class _LaunchLog:
    """Stands in for the fleet of ``actors`` live actors: records what the stream launches, and on which."""

    def __init__(self, actors: int = 1):
        self.launched: list[int] = []
        self.on: list[int | None] = []
        self.versions = dict.fromkeys(range(actors), 0)

    def launch(self, prompts, slot=None):
        self.launched.append(len(prompts))
        self.on.append(slot)
        return SimpleNamespace(slots=[slot] if slot in self.versions else list(self.versions))


def test_stream_launches_ahead_only_for_the_groups_a_waiting_take_removes():
    """Room is the buffer's capacity less what it holds and what is in flight; while a take waits, the groups it
    will remove do not count, so the next chunk starts before the step's last chunk lands."""
    from cluster.stream import RolloutStream

    fleet, buffer = _LaunchLog(), RolloutBuffer(capacity=8, max_staleness=1)
    stream = RolloutStream(fleet, buffer, lambda n, first: (list(range(n)), [None] * n), score=None, chunk=4)
    stream._fill()
    assert fleet.launched == [4, 4]  # two chunks fill the room
    stream.inflight.pop(0)  # the first chunk lands: 4 held, 4 in flight
    buffer.add([group(i, 0, [0.0, 1.0]) for i in range(4)])
    stream._fill()
    assert fleet.launched == [4, 4]  # no room: the learner has not taken
    stream.promised = 8  # a take of 8 waits: 4 of them held, 4 in flight
    stream._fill()
    assert fleet.launched == [4, 4, 4]  # the next chunk, ahead of the take; at most two in flight still
    stream.inflight.pop(0)
    buffer.add([group(i, 0, [0.0, 1.0]) for i in range(4, 8)])
    assert [g.prompt_index for g in buffer.take(8, learner_version=1)] == list(range(8))
    stream.promised = 0
    stream._fill()
    assert fleet.launched == [4, 4, 4, 4]  # after the take: one more, the room is 8 with 4 in flight


def test_stream_gives_each_chunk_to_one_actor_the_least_busy_first():
    """Two actors: a chunk goes to one actor whole, to the one with the fewest in flight, two at most each; when
    an actor's chunk lands only that actor gets the next; an actor gone from the fleet gets nothing."""
    from cluster.stream import RolloutStream

    fleet, buffer = _LaunchLog(actors=2), RolloutBuffer(capacity=16, max_staleness=1)
    stream = RolloutStream(fleet, buffer, lambda n, first: (list(range(n)), [None] * n), score=None, chunk=2)
    stream._fill()
    assert fleet.on == [0, 1, 0, 1] and fleet.launched == [2, 2, 2, 2]  # two in flight on each
    stream.inflight.pop(1)  # actor 1's first chunk lands
    stream._fill()
    assert fleet.on == [0, 1, 0, 1, 1]
    del fleet.versions[1]  # actor 1 fails: its chunks are resampled by the fleet, it gets no new ones
    stream.inflight = [item for item in stream.inflight if item[2].slots != [1]]
    stream.inflight.pop(0)
    stream._fill()
    assert fleet.on[5:] == [0]
