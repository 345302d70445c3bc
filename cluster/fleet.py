"""The generation fleet: the vLLM actors, the version each holds, and what happens when one fails.

The driver hands it prompts and gets rollouts back in prompt order; the fleet owns sharding,
launch and collect, weight fan-out, restart and catch-up, and growth. Every call has a deadline.
A failed actor never holds a step back while another can do its work:

- an actor that **died** is restarted by Ray (``generation.max_restarts``) in the background; its
  shard is sampled again at once by the live actors (by itself, once back, if it was the only one).
  When its engine is up it catches up to the latest version from the ``VersionStore`` and rejoins;
- an actor that is alive but **stuck** (its call missed ``generation.timeout_s``) is killed, and
  then handled as one that died;
- an actor out of restarts, or whose restart does not come back within
  ``generation.start_timeout_s`` (its node is gone and no other has room), is **retired**;
- with ``generation.max_num_actors`` above ``num_actors``, an actor is **added** whenever the
  cluster has room for one (say, the autoscaler brought a node). It starts in the background,
  catches up, and takes work from the next launch.

Each failure is logged with the actor's slot and counted in ``system/actor_failures_total`` and
``rollout/prompts_resampled_total``. A shard is sampled again in full, so a rollout from a failed
call is never trained on, and never twice.

A published version lives in the object store as long as its owner, the learner that put it, does. A
load that fails because the learner died with it is not the actor's failure: the actor stays live with
the weights it holds, and ``WeightsLost`` tells the driver, which restores the learner and publishes
again. A restarted actor that cannot catch up for that reason stays joining until then (or raises
``WeightsLost`` where a launch waits for it).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorDiedError, GetTimeoutError, OwnerDiedError, RayActorError, RayTaskError

from actors.config import GenerationConfig
from cluster.errors import FleetError, WeightsLost, WrongVersion
from core.records import Prompt, Rollout
from learner.weights import VersionStore


@dataclass
class Member:
    """One actor slot. ``state``: joining (engine starting or restarting) -> live -> joining ... -> retired."""

    slot: int
    handle: object
    version: int
    state: str = "live"
    ready: object = None  # the health() ref of a joining actor
    deadline: float = 0.0  # monotonic time by which a joining actor must be up
    restarts: int = 0
    cores: list[int] | None = None  # the cores the actor is pinned to (None: unpinned)


@dataclass
class Launch:
    """Work handed to the fleet and not collected yet: shard i runs on member ``slots[i]``."""

    kind: str  # "generate" (sampled rollouts) or "greedy" (texts)
    shards: list[list[Prompt]]
    slots: list[int]
    incarnations: list[int]  # each member's restart count at launch: a later failure of an older process
    refs: list
    n: int | None
    seeds: list[list[int]] | None
    version: int | None = None  # on-policy: the version every rollout must carry (a shard sampled by another is redone)
    started: float = field(default_factory=time.perf_counter)


def contiguous_shards(items: list, k: int) -> list[list]:
    """``k`` contiguous slices of near-equal size, so results concatenate back in order."""
    bounds = [i * len(items) // k for i in range(k + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(k)]


class Fleet:
    def __init__(self, cfg: GenerationConfig, policy_path: str, dtype: str, store: VersionStore,
                 runtime_env: dict | None = None, version: int = 0, log=print, sink=None,
                 cores: list[list[int]] | None = None, background_cores: list[int] | None = None):
        """``version``: that of the weights at ``policy_path`` (a resumed run's checkpoint); ``cores``: core sets
        to pin actors to, one actor per set (``cluster.resources.core_layout``); an actor beyond them is unpinned;
        ``background_cores``: where a pinned actor's background weight fetch runs (the layout's shared cores)."""
        from actors.generation import GenerationActor

        self.cfg, self.policy_path, self.dtype, self.store = cfg, policy_path, dtype, store
        self.start_version, self.log, self.sink, self.cores = version, log, sink, cores or []
        self.background_cores = background_cores
        from actors.generation import WEIGHTS_GROUP

        self._cls = ray.remote(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, max_restarts=cfg.max_restarts,
                               max_task_retries=0, concurrency_groups={WEIGHTS_GROUP: 1}
                               )(GenerationActor).options(runtime_env=runtime_env or {})
        self.members: list[Member] = []
        self.restarts = 0  # actors that came back after a failure, all slots
        self.resampled: dict[str, int] = {}  # prompts sampled again, by reason, since the last take_counts()
        self.swap_seconds: dict[int, float] = {}  # by slot: time lost to hidden-sync swaps since take_counts()
        self.staging: list[tuple[Member, object]] = []  # stage_weights calls not yet seen to finish
        self.fetch_seconds: float | None = None  # the slowest of them seen to finish since take_counts()
        # The streaming loop's background evaluation launches work from a second driver thread: membership
        # changes (launch, failure, retirement, growth) take this lock; waiting on results does not.
        self.lock = threading.RLock()

    # ---- membership -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start ``num_actors`` engines and wait until all are up (~20 s each on CPU)."""
        for _ in range(self.cfg.num_actors):
            self._spawn()
        try:
            ray.get([m.ready for m in self.members], timeout=self.cfg.start_timeout_s)
        except GetTimeoutError:
            raise FleetError(f"the generation engines did not start within generation.start_timeout_s="
                             f"{self.cfg.start_timeout_s:g} s; raise it (large models load slowly) or check the "
                             "actors' logs") from None
        for m in self.members:
            m.state, m.ready = "live", None

    def _spawn(self) -> Member:
        slot = len(self.members)
        taken = [m.cores for m in self.members if m.state != "retired"]
        cores = next((c for c in self.cores if c not in taken), None)  # a retired actor's cores pass to its heir
        handle = self._cls.remote(self.cfg, self.policy_path, self.dtype, slot, self.start_version, cores,
                                  cores and self.background_cores)
        member = Member(slot, handle, self.start_version, state="joining", ready=handle.health.remote(),
                        deadline=time.monotonic() + self.cfg.start_timeout_s, cores=cores)
        self.members.append(member)
        return member

    @property
    def live(self) -> list[Member]:
        return [m for m in self.members if m.state == "live"]

    @property
    def versions(self) -> dict[int, int]:
        """The policy version each live actor holds, by slot."""
        return {m.slot: m.version for m in self.live}

    def grow(self) -> None:
        """Admit actors whose engines came up (new, or restarted); retire those past their start deadline;
        start one more if below ``max_num_actors`` and the cluster has room for it. Never blocks."""
        with self.lock:
            self._grow()

    def _grow(self) -> None:
        for m in self.members:
            if m.state == "joining":
                self._settle(m, wait=False)
        target = self.cfg.max_num_actors or self.cfg.num_actors
        busy = sum(m.state in ("live", "joining") for m in self.members)
        if busy < target and self._room_for_one():
            self._spawn()
            self.log(f"starting generation actor {len(self.members) - 1} (the cluster has room; target {target})")

    def _settle(self, m: Member, wait: bool) -> None:
        """A joining actor: live once its health answers and it has caught up; retired if it cannot come back.
        ``wait``: block until it is one or the other."""
        while m.state == "joining":
            left = m.deadline - time.monotonic()
            try:
                ray.get(m.ready, timeout=max(0.0, left) if wait else 0)
                self._catch_up(m)
            except GetTimeoutError:
                if left <= 0:
                    self._retire(m, f"it did not come back within generation.start_timeout_s="
                                    f"{self.cfg.start_timeout_s:g} s (no node has room for it?)")
                elif not wait:
                    return
                continue
            except ActorDiedError as e:
                self._retire(m, f"it cannot be restarted ({_first_line(e)})")
                continue
            except RayTaskError as e:
                if not _weights_lost(e):
                    raise
                if wait:  # only the driver publishes anew, once it has restored the learner: not while it waits here
                    raise WeightsLost(f"generation actor {m.slot} cannot catch up: version {self.store.latest_version} "
                                      "was lost with the learner that published it") from None
                if left <= 0:
                    self._retire(m, "no version it could load was published within generation.start_timeout_s")
                    continue
                return  # still joining: a later grow tries again, once a new version is published
            except RayActorError:  # still restarting: ask again
                if left <= 0:
                    self._retire(m, "it did not come back within generation.start_timeout_s")
                    continue
                m.ready = m.handle.health.remote()
                if not wait:
                    return
                time.sleep(0.5)
                continue
            m.state, m.ready = "live", None
            if m.restarts:
                self.restarts += 1
                self._count("system/actor_restarts_total", actor_id=str(m.slot))
                self.log(f"generation actor {m.slot} is back at version {m.version}; fleet of {len(self.live)}")
            else:
                self._count("system/actors_added_total")
                self.log(f"generation actor {m.slot} joined at version {m.version}; fleet of {len(self.live)}")

    def _room_for_one(self) -> bool:
        free = ray.available_resources()
        return (free.get("CPU", 0.0) >= self.cfg.num_cpus - 1e-9
                and free.get("GPU", 0.0) >= self.cfg.num_gpus - 1e-9)

    # ---- work -----------------------------------------------------------------------------------
    def launch(self, prompts: list[Prompt], n: int | None = None, seeds: list[int] | None = None,
               kind: str = "generate", slot: int | None = None, version: int | None = None) -> Launch:
        """Start ``kind`` (generate: ``n`` samples per prompt, one seed per prompt if given; greedy) of
        ``prompts`` over the live actors, one contiguous shard each; ``slot``: all of it on that actor (the
        streaming loop's launches), or over the live actors as before if it is not live. ``version``: every
        rollout must come from it, or its shard is sampled again (the on-policy loop launches right behind a load)."""
        with self.lock:
            return self._launch(prompts, n, seeds, kind, slot, version)

    def _launch(self, prompts: list[Prompt], n: int | None, seeds: list[int] | None, kind: str,
                slot: int | None = None, version: int | None = None) -> Launch:
        members = [m for m in self.live if m.slot == slot] or self.live
        joining = [m for m in self.members if m.state == "joining"]
        while not members and joining:  # every actor is restarting: wait for the first back
            self._settle(joining.pop(0), wait=True)
            members = self.live
        if not members:
            raise FleetError("no generation actor is left: every one has failed and used up its restarts "
                             "(generation.max_restarts). The last checkpoint is intact; continue with "
                             "relay train --resume")
        shards = contiguous_shards(prompts, len(members))
        seed_shards = contiguous_shards(seeds, len(members)) if seeds else None
        refs = [self._submit(m, kind, s, n, seed_shards[i] if seed_shards else None)
                for i, (m, s) in enumerate(zip(members, shards, strict=True))]
        return Launch(kind, shards, [m.slot for m in members], [m.restarts for m in members], refs, n, seed_shards,
                      version)

    def collect(self, launch: Launch) -> tuple[list, float]:
        """Wait for a launch: rollouts (generate) or texts (greedy) in prompt order, and the seconds since
        launch. A shard whose actor failed is sampled again (module docstring)."""
        deadline = time.monotonic() + self.cfg.timeout_s
        out = []
        for i, ref in enumerate(launch.refs):
            seeds = launch.seeds[i] if launch.seeds else None
            try:
                result = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                if launch.kind == "generate":
                    self._note(self.members[launch.slots[i]], result)
                    held = {r.policy_version for r in result.rollouts}
                    if launch.version is not None and held - {launch.version}:
                        # its load failed and it sampled before it was restarted: redone, never trained on
                        raise WrongVersion(f"sampled with version {sorted(held)}, launched for {launch.version}")
                    out.extend(result.rollouts)
                else:
                    out.extend(result)
            except (RayActorError, RayTaskError, GetTimeoutError, WrongVersion) as e:
                member = self.members[launch.slots[i]]
                # a shard of the member's previous process: it has been handled (and restarted) already
                reason = self._fail(member, e) if member.restarts == launch.incarnations[i] else _reason(e)
                self.resampled[reason] = self.resampled.get(reason, 0) + len(launch.shards[i])
                out.extend(self._redo(launch.kind, launch.shards[i], launch.n, seeds, launch.version))
        return out, time.perf_counter() - launch.started

    def generate(self, prompts: list[Prompt], n: int | None = None,
                 seeds: list[int] | None = None) -> tuple[list[Rollout], float]:
        return self.collect(self.launch(prompts, n, seeds))

    def greedy(self, prompts: list[Prompt]) -> list[str]:
        return self.collect(self.launch(prompts, kind="greedy"))[0]

    def _note(self, member: Member, result) -> None:
        """What a generate call says of its actor: the version it sampled with, the time it lost swapping."""
        if result.rollouts:
            member.version = max(member.version, max(r.policy_version for r in result.rollouts))
        if result.swap_seconds:
            self.swap_seconds[member.slot] = self.swap_seconds.get(member.slot, 0.0) + result.swap_seconds

    def _submit(self, member: Member, kind: str, shard: list[Prompt], n: int | None, seeds: list[int] | None):
        if kind == "greedy":
            return member.handle.greedy.remote(shard)
        return member.handle.generate.remote(shard, n, seeds)

    def _redo(self, kind: str, shard: list[Prompt], n: int | None, seeds: list[int] | None,
              version: int | None = None) -> list:
        """Sample a failed actor's shard on the live actors; with none live, wait for a joining one."""
        return self.collect(self.launch(shard, n, seeds, kind, version=version))[0]  # waits for a restarting one

    # ---- weights --------------------------------------------------------------------------------
    def start_load(self, version: int, ref) -> list[tuple[Member, object]]:
        """Every live actor starts loading ``version`` (published as ``ref``, already in the store); each runs its
        load before any call submitted to it after this one. ``finish_load`` waits."""
        return [(m, m.handle.update_weights.remote(version, [ref])) for m in self.live]

    def finish_load(self, version: int, loading: list[tuple[Member, object]]) -> dict[str, float]:
        """Wait for ``start_load``'s loads: the slowest fetch + load and the slowest fetch alone. An actor whose
        load failed is restarted (``_fail``) and catches up. Raises ``WeightsLost`` once all have answered if
        the version went with its learner: those actors keep the weights they hold, live."""
        slowest = fetch = 0.0
        lost = []
        for m, r in loading:
            try:
                stats = ray.get(r, timeout=self.cfg.timeout_s)
                slowest = max(slowest, stats["sync/load_seconds"] + stats["sync/fetch_seconds"])
                fetch = max(fetch, stats["sync/fetch_seconds"])
                m.version = version
            except RayTaskError as e:
                if not _weights_lost(e):
                    self._fail(m, e)
                    continue
                lost.append(m.slot)
                self.log(f"generation actor {m.slot} could not load version {version}: its learner died with it "
                         f"({_first_line(e)}); the actor keeps version {m.version}")
            except (RayActorError, GetTimeoutError) as e:  # it catches up when it rejoins
                self._fail(m, e)
        if lost:
            raise WeightsLost(f"version {version} was lost with the learner that published it before actors "
                              f"{lost} loaded it")
        return {"sync/load_seconds": slowest, "sync/fetch_seconds": fetch}

    def stage(self, version: int, ref) -> None:
        """Hidden sync: every live actor starts fetching ``version`` in the background and swaps it in between
        requests; returns at once. A failed fetch is logged when seen; the actor then catches up on its own
        next stage, or rejoins through ``_catch_up`` if it died."""
        from actors.generation import WEIGHTS_GROUP

        self._check_staging()
        for m in self.live:
            self.staging.append((m, m.handle.stage_weights.options(concurrency_group=WEIGHTS_GROUP).remote(
                version, [ref])))

    def _check_staging(self) -> None:
        if not self.staging:
            return
        done, _ = ray.wait([r for _, r in self.staging], num_returns=len(self.staging), timeout=0)
        finished = set(done)
        for m, ref in [(m, r) for m, r in self.staging if r in finished]:
            try:
                seconds = ray.get(ref, timeout=0)["sync/fetch_seconds"]
                self.fetch_seconds = max(self.fetch_seconds or 0.0, seconds)
            except (RayActorError, RayTaskError) as e:  # a dead actor fails its next generate call too
                self.log(f"generation actor {m.slot}: background fetch failed ({_first_line(e)})")
        self.staging = [(m, r) for m, r in self.staging if r not in finished]

    def _catch_up(self, member: Member) -> None:
        if self.store.latest_version > member.version:
            version, ref = self.store.latest()
            ray.get(member.handle.update_weights.remote(version, [ref]), timeout=self.cfg.timeout_s)
            member.version = version

    # ---- failures -------------------------------------------------------------------------------
    def _fail(self, member: Member, error: Exception) -> str:
        """A live actor's call failed: kill it if stuck, and let it restart in the background (``_settle``).
        Returns why it failed: died or stuck."""
        with self.lock:
            return self._fail_locked(member, error)

    def _fail_locked(self, member: Member, error: Exception) -> str:
        reason = _reason(error)
        if member.state != "live":
            return reason
        self.log(f"generation actor {member.slot} {reason} ({_first_line(error)}); the others take its work while "
                 "it restarts")
        self._count("system/actor_failures_total", actor_id=str(member.slot), reason=reason)
        if reason in ("stuck", "error", "wrong_version"):  # alive but not serving right: Ray restarts it
            ray.kill(member.handle, no_restart=False)
        member.state, member.ready = "joining", member.handle.health.remote()
        member.deadline = time.monotonic() + self.cfg.start_timeout_s
        member.version, member.restarts = self.start_version, member.restarts + 1  # it restarts from policy_path
        return reason

    def _retire(self, member: Member, why: str) -> None:
        with self.lock:
            self._retire_locked(member, why)

    def _retire_locked(self, member: Member, why: str) -> None:
        if member.state == "retired":
            return
        member.state = "retired"
        ray.kill(member.handle, no_restart=True)
        self._count("system/actor_failures_total", actor_id=str(member.slot), reason="retired")
        self.log(f"generation actor {member.slot} retired: {why}; {len(self.live)} actors take its work")

    def _count(self, key: str, **tags: str) -> None:
        if self.sink is not None:
            self.sink.log({key: 1.0}, tags=tags or None)

    def take_counts(self) -> dict[str, float]:
        """Prompts sampled again since the last call, by reason, as metric keys; the slowest actor's time lost to
        hidden-sync swaps and the slowest background fetch that finished; and the live fleet size."""
        out = {f"rollout/prompts_resampled_total{{reason={r}}}": float(v) for r, v in self.resampled.items()}
        if self.swap_seconds:
            out["sync/swap_seconds"] = max(self.swap_seconds.values())
        if self.fetch_seconds is not None:
            out["sync/fetch_seconds"] = self.fetch_seconds
        self.resampled, self.swap_seconds, self.fetch_seconds = {}, {}, None
        out["system/fleet_size"] = float(len(self.live))
        return out

    def health(self) -> list[dict]:
        return ray.get([m.handle.health.remote() for m in self.live], timeout=self.cfg.timeout_s)


def _reason(error: Exception) -> str:
    """died (the process is gone), stuck (missed its deadline), error (a call raised: a wedged engine) or
    wrong_version (it sampled with weights it should no longer hold: restarted, it catches up)."""
    if isinstance(error, GetTimeoutError):
        return "stuck"
    if isinstance(error, WrongVersion):
        return "wrong_version"
    return "error" if isinstance(error, RayTaskError) else "died"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def _weights_lost(error: RayTaskError) -> bool:
    """The call failed because the weights it fetched are gone with their owner (the learner that put them)."""
    return isinstance(error.cause, OwnerDiedError)
