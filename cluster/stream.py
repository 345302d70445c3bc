"""The streaming rollout loop's producer side: keep the fleet sampling, score groups as they land.

With ``algorithm.max_staleness`` s >= 1 the driver does not generate a batch, then train on it: the
fleet samples all the time. ``RolloutStream`` keeps up to ``INFLIGHT`` chunks of
``generation.stream_chunk_prompts`` prompts launched on each actor (a chunk goes to one actor whole, so a
slow actor holds back only its own chunks), gathers each with ``ray.wait`` as soon as it completes, scores
it through the reward service at once, and admits its groups to the bounded ``RolloutBuffer``. While the
learner trains, the driver ``pump``s the stream; new weights reach the actors in the background
(``Fleet.stage``) and are swapped in between chunks. The buffer holds at most s steps' worth of groups, so
nothing it holds can grow more than s versions old before it is taken, and ``take`` drops (counted) whatever
would.

On-policy (s = 0) and deterministic runs do not stream: they sample each step's batch in order
(``Driver._step``), which is what makes them exact.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from cluster.fleet import Fleet, FleetError, Launch
from cluster.rollout_buffer import Group, RolloutBuffer, by_group
from core.records import Rollout, ScoredRollout

INFLIGHT = 2
"""chunks launched and not collected, per actor: one samples while the next waits, so an actor never idles
between them"""


@dataclass
class _Landed:
    """What landed since the last ``take``: for the step's rollout and reward metrics."""

    rollouts: int = 0
    tokens: int = 0
    reward_stats: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    since: float = field(default_factory=time.perf_counter)


class RolloutStream:
    def __init__(self, fleet: Fleet, buffer: RolloutBuffer, next_prompts: Callable[[int, int], tuple[list, list]],
                 score: Callable[[list[Rollout]], tuple[list[ScoredRollout], dict[str, float]]], chunk: int,
                 max_filtered: int | None = None):
        """``next_prompts(n, first_group)``: the next ``n`` training prompt indices and prompts, group ids from
        ``first_group``; ``score(rollouts)``: scored rollouts and the call's reward stats; ``max_filtered``: once
        the buffer's filters have refused this many groups since the last take, a step takes what the buffer
        holds (``algorithm.max_extra_prompts_per_step``), so a policy whose groups all score alike cannot stall."""
        self.fleet, self.buffer, self.next_prompts, self.score, self.chunk = fleet, buffer, next_prompts, score, chunk
        self.max_filtered = max_filtered
        self.inflight: list[tuple[list[int], int, Launch]] = []  # prompt indices, first group id, launch
        self.next_group = 0  # group ids are unique over the run, so groups of any chunks can share a step
        self.promised = 0  # groups a waiting ``take`` will remove as they land: they do not hold the room
        self.landed = _Landed()

    # ---- producing --------------------------------------------------------------------------------------
    def _fill(self) -> None:
        """Launch chunks while fewer than INFLIGHT run and the buffer has room for what is in flight too; a chunk
        shrinks to the room left (filters admit fewer groups than were launched, so the room is not a multiple
        of the chunk). While a ``take`` waits, the groups it will remove do not count against the room: the
        next chunk is launched before the step's last chunk lands, so the actors do not idle while the driver
        scores it and starts the learner (the actor's process was busy 87% of a streaming run without this, 91%
        with; one 110 s run each on 2 cores). Such a chunk is sampled by the version the learner holds now and
        is taken at most ``max_staleness`` steps later: AReaL's launch rule, at most (version + s + 1) batches
        launched (Fu et al. 2025, arXiv:2505.24298). Each chunk goes to the live actor with the fewest in flight,
        up to INFLIGHT each."""
        while True:
            free = self.buffer.room() + self.promised - sum(len(picks) for picks, _, _ in self.inflight)
            count = dict.fromkeys(self.fleet.versions, 0)  # live actors: chunks in flight on each
            for _, _, launch in self.inflight:
                for s in launch.slots:
                    if s in count:
                        count[s] += 1
            slot = min(count, key=count.get, default=None)  # None: every actor is restarting
            if free <= 0 or (slot is None and self.inflight) or (slot is not None and count[slot] >= INFLIGHT):
                return
            picks, prompts = self.next_prompts(min(self.chunk, free), self.next_group)
            self.inflight.append((picks, self.next_group, self.fleet.launch(prompts, slot=slot)))
            self.next_group += len(prompts)

    def pump(self, timeout: float, also: list | None = None) -> None:
        """Launch what fits, then wait up to ``timeout`` seconds until a chunk or any ref in ``also`` (the
        learner's step) completes; score and admit every chunk that has completed."""
        self._fill()
        refs = [r for _, _, launch in self.inflight for r in launch.refs]
        if not refs and not also:
            return
        ray.wait(refs + list(also or []), num_returns=1, timeout=timeout)
        for item in list(self.inflight):
            picks, first_group, launch = item
            if len(ray.wait(launch.refs, num_returns=len(launch.refs), timeout=0)[0]) < len(launch.refs):
                continue
            self.inflight.remove(item)
            self._land(picks, first_group, launch)
        self._fill()

    def _land(self, picks: list[int], first_group: int, launch: Launch) -> None:
        rollouts, _ = self.fleet.collect(launch)  # a failed shard is sampled again on the live actors
        scored, stats = self.score(rollouts)
        self.landed.rollouts += len(rollouts)
        self.landed.tokens += sum(len(r.response_ids) for r in rollouts)
        self.landed.reward_stats.append((len(rollouts), stats))
        self.buffer.add([Group(picks[gid - first_group], samples) for gid, samples in by_group(scored).items()])

    # ---- consuming --------------------------------------------------------------------------------------
    def take(self, n: int, learner_version: int, timeout_s: float) -> tuple[list[Group], dict[str, float]]:
        """Pump until the buffer holds ``n`` groups within the staleness bound; those groups, and the metrics
        of the step: what landed since the last take, the wait, the queue depth left."""
        started = time.perf_counter()
        deadline = time.monotonic() + timeout_s
        self.promised = n
        try:
            while not self.buffer.ready(n, learner_version):
                if self.max_filtered is not None and sum(self.buffer.filtered.values()) >= self.max_filtered:
                    break  # enough prompts drawn beyond the step: train on the groups admitted so far
                if time.monotonic() > deadline:
                    raise FleetError(f"the rollout buffer did not fill with {n} groups within {timeout_s:g} s "
                                     f"(generation.timeout_s); it holds {len(self.buffer)}. Check the actors' logs")
                self.pump(timeout=1.0)
        finally:
            self.promised = 0
        wait = time.perf_counter() - started
        groups = self.buffer.take(n, learner_version)
        return groups, {**self._step_metrics(groups, learner_version), "rollout/wait_seconds": wait,
                        **self.buffer.take_counts()}

    def _step_metrics(self, groups: list[Group], learner_version: int) -> dict[str, float]:
        landed, self.landed = self.landed, _Landed()
        samples = [s for g in groups for s in g.samples]
        lengths = [len(s.rollout.response_ids) for s in samples]
        rewards = [s.reward for s in samples] or [0.0]
        mean = sum(rewards) / len(rewards)
        out = {
            "rollout/tokens_per_second": landed.tokens / max(time.perf_counter() - landed.since, 1e-9),
            "rollout/generated_tokens_total": float(landed.tokens),
            "rollout/samples_total": float(landed.rollouts),
            "rollout/response_length_mean_tokens": sum(lengths) / max(len(lengths), 1),
            "rollout/staleness_versions": float(learner_version - min((g.version for g in groups),
                                                                      default=learner_version)),
            **token_staleness([s.rollout for s in samples], learner_version),
            "reward/truncated_total": float(sum(s.rollout.finish_reason == "length" for s in samples)),
        }
        out.update(_merge_reward_stats(landed.reward_stats))
        out["reward/mean"] = mean  # of the samples trained on this step
        out["reward/std"] = (sum((x - mean) ** 2 for x in rewards) / len(rewards)) ** 0.5
        return out

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def pending(self) -> list[int]:
        """Training prompt indices launched or buffered, not trained: a checkpoint puts them back in the order."""
        return [i for picks, _, _ in self.inflight for i in picks] + [g.prompt_index for g in self.buffer.groups]

    def reset(self) -> list[int]:
        """Forget everything in flight and buffered (a learner restored from a checkpoint); returns what was."""
        pending = self.pending()
        self.inflight.clear()
        self.buffer.clear()
        self.landed = _Landed()
        return pending


def _merge_reward_stats(parts: list[tuple[int, dict[str, float]]]) -> dict[str, float]:
    """Reward stats of several score calls as one: totals and seconds summed, other values weighted by the
    calls' sample counts."""
    out: dict[str, float] = {}
    weight = sum(n for n, _ in parts) or 1
    for n, stats in parts:
        for key, value in stats.items():
            if key.endswith(("_total", "_seconds")) or "_total{" in key:
                out[key] = out.get(key, 0.0) + value
            else:
                out[key] = out.get(key, 0.0) + value * n / weight
    return out


def token_staleness(rollouts: list, learner_version: int) -> dict[str, float]:
    """Per token rather than per rollout (partial rollouts mix versions within a response): the mean number of
    versions each trained token is behind the learner, and the share of rollouts sampled by more than one version."""
    behind = [learner_version - v for r in rollouts
              for v in (r.token_versions or [r.policy_version] * len(r.response_ids))]
    mixed = sum(len(set(r.token_versions)) > 1 for r in rollouts)
    return {"rollout/token_staleness_mean": sum(behind) / max(len(behind), 1),
            "rollout/mixed_version_fraction": mixed / max(len(rollouts), 1)}
