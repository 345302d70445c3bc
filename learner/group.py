"""A learner group: M learner actors in one Ray placement group, addressed as one learner.

The driver holds a ``LearnerGroup`` whatever M is. With M > 1 the ranks form a torch.distributed group
(``learner/distributed.py``) whose rendezvous is rank 0's node address and a free port found there
through Ray, never a fixed one. A step's scored rollouts are split over the ranks by whole groups
(balanced by tokens), padded to one width; every rank trains on its share and the collectives make
it one update. Weights leave from rank 0, one ``ray.put`` per version, as from a single learner.

Every call has a deadline. A rank that dies or misses it fails the call with ``RankFailed`` naming it;
the driver then kills the whole group and restores it from the last checkpoint.
"""

from __future__ import annotations

import time

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from core.records import ScoredRollout
from learner.config import LearnerConfig


class RankFailed(RuntimeError):
    """A learner rank died, or did not answer within ``learner.timeout_s``."""


class GroupCall:
    """A call running on every rank: ``refs`` (rank order) to wait on, ``results`` to gather them."""

    def __init__(self, method: str, refs: list, deadline: float, timeout_s: float):
        self.method, self.refs, self.deadline, self.timeout_s = method, refs, deadline, timeout_s

    def results(self) -> list:
        """Every rank's result, in rank order. The first rank to die or miss the deadline fails the call, named."""
        rank_of = {ref: r for r, ref in enumerate(self.refs)}
        results: dict[int, object] = {}
        pending = list(self.refs)
        while pending:  # one deadline for the whole call, not one per rank
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, self.deadline - time.monotonic()))
            if not done:
                late = sorted(rank_of[p] for p in pending)
                raise RankFailed(f"learner rank(s) {late} did not answer {self.method} within {self.timeout_s:g} s "
                                 f"(learner.timeout_s)")
            r = rank_of[done[0]]
            try:
                results[r] = ray.get(done[0])
            except ray.exceptions.RayActorError as e:
                raise RankFailed(f"learner rank {r} of {len(self.refs)} died during {self.method}: "
                                 f"{_first_line(e)}") from e
        return [results[r] for r in range(len(self.refs))]


class LearnerGroup:
    def __init__(self, lc: LearnerConfig, args: tuple, kwargs: dict, runtime_env: dict | None = None,
                 start_timeout_s: float = 600.0):
        """``args``/``kwargs``: ``Learner``'s, without the rank arguments, which the group adds."""
        from learner.distributed import free_port
        from learner.learner import Learner

        self.lc, self.timeout_s = lc, lc.timeout_s
        m = lc.num_workers
        cls = ray.remote(num_cpus=lc.num_cpus, num_gpus=lc.num_gpus, max_restarts=0)(Learner)
        self.pg = None
        if m == 1:
            self.actors = [cls.options(runtime_env=runtime_env).remote(*args, **kwargs)]
            self.actors[0].freeze_heap.remote()  # queued behind the constructor
            return
        bundle = {"CPU": lc.num_cpus, **({"GPU": lc.num_gpus} if lc.num_gpus else {})}
        self.pg = placement_group([bundle] * m, strategy="PACK" if lc.placement == "pack" else "SPREAD")
        try:
            ray.get(self.pg.ready(), timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RankFailed(f"the cluster has no room for {m} learner ranks of {bundle} within {start_timeout_s:g} s "
                             f"(learner.num_workers, num_cpus, num_gpus); lower them or add nodes") from None
        on = [PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i) for i in range(m)]
        host, port = ray.get(ray.remote(free_port).options(num_cpus=0, scheduling_strategy=on[0]).remote(),
                             timeout=start_timeout_s)
        self.actors = [cls.options(runtime_env=runtime_env, scheduling_strategy=on[r]).remote(
            *args, **kwargs, rank=r, world_size=m, address=f"{host}:{port}") for r in range(m)]
        try:
            self._all("state", timeout_s=start_timeout_s)  # constructors done: the process group is up
        except BaseException:
            self.kill()  # the ranks that did start and the placement group go back
            raise
        for a in self.actors:
            a.freeze_heap.remote()

    # ---- calls -----------------------------------------------------------------------------------------
    def _all(self, method: str, *args, per_rank: list[tuple] | None = None, timeout_s: float | None = None) -> list:
        """``method`` on every rank (``per_rank[r]`` as rank r's arguments, else ``args``); their results in rank
        order. The first rank to die or miss the deadline fails the call, named."""
        return self._submit(method, *args, per_rank=per_rank, timeout_s=timeout_s).results()

    def _submit(self, method: str, *args, per_rank: list[tuple] | None = None,
                timeout_s: float | None = None) -> GroupCall:
        refs = [getattr(a, method).remote(*(per_rank[r] if per_rank else args)) for r, a in enumerate(self.actors)]
        return GroupCall(method, refs, time.monotonic() + (timeout_s or self.timeout_s), timeout_s or self.timeout_s)

    def train_step(self, scored: list[ScoredRollout]) -> dict[str, float]:
        return self.train_step_async(scored).results()[0]

    def train_step_async(self, scored: list[ScoredRollout]) -> GroupCall:
        """Start one step on every rank and return at once (the streaming loop samples meanwhile)."""
        shares = split_by_group(scored, len(self.actors))
        width = max((len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in scored), default=2)
        return self._submit("train_step", per_rank=[(share, width) for share in shares])

    def publish(self):
        return self.publish_async().results()[0]

    def publish_async(self) -> GroupCall:
        """Queue a publish on every rank behind what each already has queued: sent right behind a step, the learner
        packs the new version as soon as it has trained, without waiting for the driver to ask."""
        return self._submit("publish")

    def save(self, path: str) -> str:
        return self._all("save", path)[0]

    def load_state(self, path: str) -> int:
        return self._all("load_state", path)[0]

    def set_version(self, version: int) -> None:
        self._all("set_version", version)

    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        return self._all("sequence_logprobs", prompt_ids, response_ids)[0]

    def pair_logprobs(self, pairs: list, length_normalize: bool = False) -> list[tuple[float, float]]:
        shares, width = _chunks(pairs, len(self.actors)), _pair_width(pairs)
        results = self._all("pair_logprobs", per_rank=[(share, length_normalize, width) for share in shares])
        return [x for part in results for x in part]

    def preference_step(self, pairs: list, reference: list, cfg, train: bool = True) -> dict[str, float]:
        """One DPO/IPO step (``train=False``: held-out measurement) over the ranks, pairs split in contiguous shares."""
        m, width = len(self.actors), _pair_width(pairs)
        shares, refs = _chunks(pairs, m), _chunks(reference, m)
        return self._all("preference_step", per_rank=[(s, r, cfg, train, width) for s, r in zip(shares, refs,
                                                                                                 strict=True)])[0]

    def weighted_nll_step(self, samples: list, weights: list[float], train: bool = True) -> dict[str, float]:
        """One offline RWR step over the ranks, records split in contiguous shares with their weights."""
        m = len(self.actors)
        width = max((len(s.prompt_ids) + len(s.response_ids) for s in samples), default=2)
        shares, ws = _chunks(samples, m), _chunks(weights, m)
        return self._all("weighted_nll_step", per_rank=[(s, w, train, width) for s, w in zip(shares, ws,
                                                                                               strict=True)])[0]

    def greedy_responses(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        return self._all("greedy_responses", prompts, max_new_tokens)[0]

    def memory(self) -> list[dict[str, float]]:
        return self._all("memory")

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def split_by_group(scored: list[ScoredRollout], ranks: int) -> list[list[ScoredRollout]]:
    """``scored`` cut into ``ranks`` shares of whole groups (a group's statistics stay on one rank), the
    largest groups first onto the share with the fewest tokens so far; order within a share is kept."""
    if ranks == 1:
        return [list(scored)]
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(scored):
        groups.setdefault(s.rollout.group_id, []).append(i)
    tokens = {g: sum(len(scored[i].rollout.prompt_ids) + len(scored[i].rollout.response_ids) for i in idx)
              for g, idx in groups.items()}
    load, owner = [0] * ranks, {}
    for g in sorted(groups, key=lambda g: (-tokens[g], g)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owner[g] = r
        load[r] += tokens[g]
    return [[s for s in scored if owner[s.rollout.group_id] == r] for r in range(ranks)]


def _chunks(items: list, ranks: int) -> list[list]:
    """``items`` in ``ranks`` contiguous shares of near-equal size."""
    size, extra = divmod(len(items), ranks)
    out, start = [], 0
    for r in range(ranks):
        end = start + size + (r < extra)
        out.append(list(items[start:end]))
        start = end
    return out


def _pair_width(pairs: list) -> int:
    return max((len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), default=2)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
