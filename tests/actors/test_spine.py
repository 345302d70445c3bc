"""The actor-learner spine on a real local Ray: vLLM actors, Serve reward, learner, object-store sync.

One driver with two generation actors is shared by the module (engine start costs ~20 s each).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import ray

from cluster.config import load_config
from cluster.driver import Driver, LearnerDied, RunError, _BackgroundEval, resolve_policy, sampling_seed
from cluster.errors import WeightsLost
from cluster.resources import check_resources

PROBE = ([1, 2, 3], [4, 5, 6, 7])  # a fixed token sequence: prompt ids, response ids


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cfg = load_config(overrides=[
        "sft.steps=30", "generation.num_actors=2", "generation.num_cpus=0.5", "learner.num_cpus=0.5",
        "generation.torch_threads=1",  # two engines share the 2 cores
        "generation.max_num_seqs=64",
        "train.prompts_per_step=12", "train.eval_prompts=40", "generation.samples_per_prompt=4",
        f"train.run_dir={tmp_path_factory.mktemp('run')}", "metrics.progress=false",
        "reward.http_enabled=false", "model.cache_dir=.relay_cache",
    ])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False)
    check_resources(cfg)
    d = Driver(cfg, resolve_policy(cfg))
    d.start()
    yield d
    d.shutdown()
    ray.shutdown()


def vllm_logprobs(actor):
    return ray.get(actor.sequence_logprobs.remote(*PROBE), timeout=60)


def learner_logprobs(d):
    return d.learner.sequence_logprobs(*PROBE)


def assert_close(a, b, tol=1e-4):
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol, (a, b)


def one_training_step(d):
    rollouts, _ = d.fleet.generate(d.next_prompts()[1])
    scored, _ = d.score(rollouts)
    # Guarantee a non-uniform group so the update really changes the weights.
    scored = [s.__class__(s.rollout, float(i % 2), s.components) for i, s in enumerate(scored)]
    return d.learner.train_step(scored)


def handle(d, slot):
    return d.fleet.members[slot].handle


def settled(d, slot, timeout=120):
    """Let the fleet admit or retire a joining actor (the driver does this every step); its final state."""
    deadline = time.monotonic() + timeout
    while d.fleet.members[slot].state == "joining" and time.monotonic() < deadline:
        d.fleet.grow()
        time.sleep(0.5)
    return d.fleet.members[slot].state


def test_every_prompt_sampled_exactly_once_per_step(driver):
    _, prompts = driver.next_prompts()
    rollouts, _ = driver.fleet.generate(prompts)
    per_group = Counter(r.group_id for r in rollouts)
    k = driver.cfg.generation.samples_per_prompt
    assert per_group == {p.index: k for p in prompts}
    assert [r.group_id for r in rollouts] == sorted(r.group_id for r in rollouts)  # prompt order
    assert {r.actor_id for r in rollouts} == {0, 1}
    for r in rollouts:
        assert len(r.sampling_logprobs) == len(r.response_ids) > 0
        assert r.metadata["answer"] and r.policy_version == driver.fleet.versions[r.actor_id]


def test_per_prompt_seeds_make_sampling_reproducible(driver):
    _, prompts = driver.next_prompts()
    seeds = [sampling_seed(0, 1, p.index) for p in prompts]
    first, _ = driver.fleet.generate(prompts, seeds=seeds)
    driver.fleet.generate(prompts)  # unseeded work in between moves the engines' own random state
    again, _ = driver.fleet.generate(prompts, seeds=seeds)
    other, _ = driver.fleet.generate(prompts, seeds=[sampling_seed(0, 2, p.index) for p in prompts])
    assert [r.response_ids for r in first] == [r.response_ids for r in again]
    assert [r.response_ids for r in first] != [r.response_ids for r in other]


def test_response_texts_equal_vllm_detokenizer(driver):
    """The actor samples with detokenize=False and decodes each response once, in one batch; the texts equal
    what vLLM's own incremental detokenizer gives for the same seeded samples, sampled and greedy."""
    _, prompts = driver.next_prompts()
    seeds = [sampling_seed(0, 7, p.index) for p in prompts]

    def both(actor):
        ours = actor.generate(prompts, seeds=seeds).rollouts
        params = [actor._sampling(actor.cfg.samples_per_prompt, False, seed) for seed in seeds]
        greedy = actor._sampling(1, greedy=True)
        for p in [*params, greedy]:
            p.detokenize = True
        outs = actor._run(prompts, params)
        theirs = [(list(s.token_ids), s.text) for out in outs for s in out.outputs]
        greedy_theirs = [out.outputs[0].text for out in actor._run(prompts, greedy)]
        return [(r.response_ids, r.response_text) for r in ours], theirs, actor.greedy(prompts), greedy_theirs

    def same(a: str, b: str) -> bool:
        # One difference, by design: an unfinished UTF-8 character at the end (the tiny model samples single
        # bytes) is U+FFFD in Hugging Face's decode, which Relay and TRL use, and withheld by vLLM's.
        return a == b or a.rstrip("\ufffd") == b

    ours, theirs, greedy_ours, greedy_theirs = ray.get(handle(driver, 0).__ray_call__.remote(both), timeout=120)
    assert [ids for ids, _ in ours] == [ids for ids, _ in theirs] and any(text for _, text in ours)
    assert all(same(a, b) for (_, a), (_, b) in zip(ours, theirs, strict=True)), (ours, theirs)
    assert all(same(a, b) for a, b in zip(greedy_ours, greedy_theirs, strict=True))


def test_vllm_matches_learner_after_sync(driver):
    stats = one_training_step(driver)
    assert stats["learner/kept_fraction"] > 0
    before = vllm_logprobs(handle(driver, 0))
    sync = driver.sync()
    assert sync["sync/bytes"] > 1e6 and sync["sync/seconds"] > 0
    after = vllm_logprobs(handle(driver, 0))
    reference = learner_logprobs(driver)
    assert max(abs(x - y) for x, y in zip(before, after, strict=True)) > 1e-4  # the weights did change
    for m in driver.fleet.live:
        assert_close(vllm_logprobs(m.handle), reference)


def test_actor_that_missed_versions_catches_up_from_latest_ref(driver):
    lagging = driver.fleet.members[1]
    version_before = ray.get(lagging.handle.health.remote(), timeout=30)["policy_version"]
    for _ in range(2):  # two versions published, only actor 0 loads them
        one_training_step(driver)
        version, ref, _ = driver.learner.publish()
        driver.store.add(version, ref[0])
        ray.get(handle(driver, 0).update_weights.remote(version, ref), timeout=60)
    assert ray.get(lagging.handle.health.remote(), timeout=30)["policy_version"] == version_before
    driver.fleet._catch_up(lagging)
    assert ray.get(lagging.handle.health.remote(), timeout=30)["policy_version"] == driver.store.latest_version
    assert_close(vllm_logprobs(lagging.handle), learner_logprobs(driver))


@ray.remote(num_cpus=0)
class Owner:
    """Puts an object and so owns it: a learner that published a version and then died, when killed."""

    def put(self, value):
        return [ray.put(value)]


def test_weights_lost_with_their_learner_leave_the_actors_live(driver, monkeypatch):
    """A version whose learner died before the actors loaded it went with it (a ``ray.put`` object lives as long as
    its owner). The loads fail, but not through the actors' fault: they stay live, unrestarted, with the weights
    they hold, and the driver's sync raises WeightsLost, a LearnerDied (the run restores the learner and publishes
    again). An actor coming back from a restart whose catch-up meets the lost version waits for the next one (or,
    where a launch waits for it, raises WeightsLost too)."""
    one_training_step(driver)
    version, ref, _ = driver.learner.publish()
    owner = Owner.remote()
    lost = ray.get(owner.put.remote(ray.get(ref[0], timeout=60)), timeout=60)
    ray.kill(owner, no_restart=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the owner's death reaches the object store in a moment
        try:
            ray.get(lost[0], timeout=10)
            time.sleep(0.2)
        except ray.exceptions.OwnerDiedError:
            break
    else:
        pytest.fail("the killed owner's object could still be read after 60 s")
    held = {m.slot: m.version for m in driver.fleet.live}
    restarts, lines = driver.fleet.restarts, []
    monkeypatch.setattr(driver.fleet, "log", lines.append)
    monkeypatch.setattr(driver, "_publish", lambda: (version, lost[0], {}))
    with pytest.raises(LearnerDied, match=f"version {version} was lost with the learner") as raised:
        driver.sync()  # a LearnerDied: _guarded_step restores the learner, as for any dead learner
    assert isinstance(raised.value, WeightsLost)
    assert {m.slot: m.version for m in driver.fleet.live} == held and driver.fleet.restarts == restarts
    for m in driver.fleet.live:
        assert ray.get(m.handle.health.remote(), timeout=30)["policy_version"] == held[m.slot]
        assert any(f"generation actor {m.slot} could not load version {version}" in line for line in lines), lines
    with pytest.raises(WeightsLost):  # the fleet's own call, as the driver's restore would meet it
        driver.fleet.finish_load(version, driver.fleet.start_load(version, lost[0]))
    monkeypatch.undo()

    back = driver.fleet.live[-1]  # as an actor Ray restarted is: joining, to catch up from the store's latest
    back.state, back.ready, back.deadline = "joining", back.handle.health.remote(), time.monotonic() + 120
    ray.get(back.ready, timeout=60)  # it answers: what it meets next is the catch-up
    driver.store.add(version, lost[0])
    tried = []
    monkeypatch.setattr(driver.fleet, "_catch_up", lambda m, catch_up=driver.fleet._catch_up: (
        tried.append(m.slot), catch_up(m)))
    driver.fleet.grow()
    assert tried == [back.slot] and back.state == "joining"  # not failed, not retired: it waits for a new version
    with pytest.raises(WeightsLost, match=f"actor {back.slot} cannot catch up"):
        driver.fleet._settle(back, wait=True)  # a launch waiting for it: the driver restores the learner first
    assert back.state == "joining" and driver.fleet.restarts == restarts

    def evaluate():  # a background evaluation's launch met the same: that step goes unevaluated, the run goes on
        raise WeightsLost(f"version {version} was lost")

    monkeypatch.setattr(driver, "log", lines.append)
    driver._eval_job = _BackgroundEval(evaluate, driver.step)
    assert driver._finish_eval(wait=True) == {} and driver._eval_job is None
    assert any(f"the evaluation of step {driver.step} did not run" in line for line in lines), lines
    monkeypatch.undo()
    one_training_step(driver)
    fresh, ref, _ = driver.learner.publish()
    driver.store.add(fresh, ref[0])
    assert settled(driver, back.slot) == "live" and back.version == fresh and driver.fleet.restarts == restarts
    driver.sync()
    for m in driver.fleet.live:
        assert_close(vllm_logprobs(m.handle), learner_logprobs(driver))


def test_on_policy_shard_from_other_weights_is_redone_and_its_actor_restarted(driver):
    """The on-policy loop launches the next batch right behind each actor's load; an actor that still holds an
    older version (here: it skipped the load, as after a failed one) has its shard sampled again by one that
    holds the version launched for, and is restarted, catching up. Actor 0 is the one: the tests below use up
    actor 1's restarts (generation.max_restarts)."""
    one_training_step(driver)
    version, ref, _ = driver.learner.publish()
    driver.store.add(version, ref[0])
    other = driver.fleet.members[1]
    loading = [(other, other.handle.update_weights.remote(version, ref))]  # actor 0 misses the load
    _, prompts = driver.next_prompts()
    launched = driver.fleet.launch(prompts, version=version)
    assert driver.fleet.finish_load(version, loading)["sync/load_seconds"] > 0
    lines = []
    driver.fleet.log = lines.append
    try:
        rollouts, _ = driver.fleet.collect(launched)
    finally:
        driver.fleet.log = driver.log
    k = driver.cfg.generation.samples_per_prompt
    assert Counter(r.group_id for r in rollouts) == {p.index: k for p in prompts}
    assert {r.policy_version for r in rollouts} == {version} and {r.actor_id for r in rollouts} == {1}
    assert any("generation actor 0 wrong_version" in line for line in lines), lines
    counts = driver.fleet.take_counts()
    assert counts["rollout/prompts_resampled_total{reason=wrong_version}"] == len(launched.shards[0])
    assert settled(driver, 0) == "live"
    assert ray.get(handle(driver, 0).health.remote(), timeout=30)["policy_version"] == version


def test_run_survives_a_crashed_generation_actor(driver):
    one_training_step(driver)
    driver.sync()
    victim = handle(driver, 1)
    pid = ray.get(victim.health.remote(), timeout=30)["pid"]
    restarts = driver.fleet.restarts  # an earlier test in the module may have restarted one
    ray.kill(victim, no_restart=False)  # the process dies; Ray restarts it (max_restarts)
    _, prompts = driver.next_prompts()
    started = time.monotonic()
    rollouts, _ = driver.fleet.generate(prompts)  # actor 0 samples the dead one's shard too
    print(f"\nactor kill: the batch completed {time.monotonic() - started:.1f} s after it")
    assert len(rollouts) == len(prompts) * driver.cfg.generation.samples_per_prompt
    counts = driver.fleet.take_counts()
    assert counts["rollout/prompts_resampled_total{reason=died}"] == len(prompts) - len(prompts) // 2
    assert counts["system/fleet_size"] == 1.0
    assert settled(driver, 1) == "live" and driver.fleet.restarts == restarts + 1
    print(f"actor kill: the actor was back {time.monotonic() - started:.1f} s after it")
    health = ray.get(victim.health.remote(), timeout=30)
    assert health["pid"] != pid and health["policy_version"] == driver.store.latest_version
    assert_close(vllm_logprobs(victim), learner_logprobs(driver))


def test_stuck_actor_is_killed_restarted_and_caught_up(driver):
    """An actor that is alive but never answers (here: busy in a 10-minute sleep) misses its deadline."""
    victim = handle(driver, 1)
    pid = ray.get(victim.health.remote(), timeout=30)["pid"]
    victim.__ray_call__.remote(lambda self: time.sleep(600))
    lines, deadline = [], driver.cfg.generation.timeout_s
    driver.fleet.log, driver.cfg.generation.timeout_s = lines.append, 15.0
    try:
        _, prompts = driver.next_prompts()
        started = time.monotonic()
        rollouts, _ = driver.fleet.generate(prompts)
        took = time.monotonic() - started
    finally:
        driver.fleet.log, driver.cfg.generation.timeout_s = driver.log, deadline
    assert Counter(r.group_id for r in rollouts) == {p.index: driver.cfg.generation.samples_per_prompt
                                                     for p in prompts}
    assert any("generation actor 1 stuck" in line for line in lines), lines
    assert 15.0 <= took < 60.0  # the deadline, then actor 0 samples the shard; the restart runs meanwhile
    print(f"\nstuck actor (15 s deadline): the batch completed {took:.1f} s after the call")
    assert settled(driver, 1) == "live"
    health = ray.get(victim.health.remote(), timeout=30)
    assert health["pid"] != pid and health["policy_version"] == driver.store.latest_version
    assert driver.fleet.take_counts()["rollout/prompts_resampled_total{reason=stuck}"] > 0


def test_fleet_retires_an_actor_for_good_and_grows_back(driver):
    """An actor that cannot come back is retired and the others take its prompts; with room in the cluster
    and generation.max_num_actors above the fleet, a new actor starts, catches up and takes work."""
    ray.kill(handle(driver, 1), no_restart=True)
    _, prompts = driver.next_prompts()
    rollouts, _ = driver.fleet.generate(prompts)
    assert Counter(r.group_id for r in rollouts) == {p.index: driver.cfg.generation.samples_per_prompt
                                                     for p in prompts}
    assert {r.actor_id for r in rollouts} == {0}
    counts = driver.fleet.take_counts()
    assert counts["system/fleet_size"] == 1.0 and counts["rollout/prompts_resampled_total{reason=died}"] > 0
    assert settled(driver, 1) == "retired"

    driver.cfg.generation.max_num_actors = 2
    try:
        driver.fleet.grow()  # starts one (its engine takes ~20 s)
        deadline = time.monotonic() + 120
        while len(driver.fleet.live) < 2 and time.monotonic() < deadline:
            time.sleep(2)
            driver.fleet.grow()
    finally:
        driver.cfg.generation.max_num_actors = None
    assert [m.slot for m in driver.fleet.live] == [0, 2]
    newcomer = handle(driver, 2)
    assert ray.get(newcomer.health.remote(), timeout=30)["policy_version"] == driver.store.latest_version
    assert_close(vllm_logprobs(newcomer), learner_logprobs(driver))
    rollouts, _ = driver.fleet.generate(prompts)
    assert {r.actor_id for r in rollouts} == {0, 2}


def test_engine_runs_generation_max_num_seqs_at_once(driver):
    """generation.max_num_seqs reaches vLLM's scheduler (null keeps vLLM's own default, 256 on CPU)."""
    def max_num_seqs(actor):
        return actor.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs

    assert ray.get(handle(driver, 0).__ray_call__.remote(max_num_seqs), timeout=60) == 64


def test_greedy_evaluation_is_deterministic(driver):
    a, b = driver.evaluate(), driver.evaluate()
    assert a["eval/task_score"] == b["eval/task_score"] and 0.0 <= a["eval/task_score"] <= 1.0


def test_streaming_loop_trains_every_admitted_group_once_within_staleness(driver):
    """max_staleness 1: the fleet samples while the learner trains, groups are scored as they land; every
    group the buffer admitted is trained on exactly once (or is still waiting, or was dropped as too old and
    counted), none older than 1 version; each chunk is sampled by one actor whole, and both actors sample."""
    driver.cfg.algorithm.max_staleness = 1
    driver.stream = driver._build_stream()
    admitted, taken, steps = [], [], []
    add, take = driver.stream.buffer.add, driver.stream.buffer.take

    def recording_add(groups):
        n = add(groups)
        admitted.extend(groups[:n] if n == len(groups) else [g for g in groups if g in driver.stream.buffer.groups])
        return n

    def recording_take(n, learner_version):
        out = take(n, learner_version)
        steps.append((learner_version, out))
        taken.extend(out)
        return out

    dropped, drop_stale = [], driver.stream.buffer.drop_stale

    def recording_drop_stale(learner_version):  # a chunk sampled before its actor swapped in a new version
        before = list(driver.stream.buffer.groups)
        drop_stale(learner_version)
        kept = {id(g) for g in driver.stream.buffer.groups}
        dropped.extend(g for g in before if id(g) not in kept)

    launched, launch = [], driver.fleet.launch

    def recording_launch(*args, **kwargs):
        out = launch(*args, **kwargs)
        launched.append(out.slots)
        return out

    driver.stream.buffer.add, driver.stream.buffer.take = recording_add, recording_take
    driver.stream.buffer.drop_stale = recording_drop_stale
    driver.fleet.launch = recording_launch
    live = set(driver.fleet.versions)  # two actors (their slots depend on the tests before: one may have retired)
    try:
        metrics = [driver._stream_step() for _ in range(4)]
        assert all(len(slots) == 1 for slots in launched)  # each chunk on one actor whole
        assert len(live) == 2 and {slots[0] for slots in launched} == live  # and both actors sample
        ids = [s.rollout.group_id for g in taken for s in g.samples[:1]]
        assert len(ids) == len(set(ids)) == 4 * driver.cfg.train.prompts_per_step  # each group once
        left = list(driver.stream.buffer.groups)
        # every admitted group is trained on, still waiting, or dropped as too old and counted
        assert {id(g) for g in admitted} == {id(g) for g in taken} | {id(g) for g in left} | {id(g) for g in dropped}
        assert sum(m.get("rollout/dropped_total{reason=stale}", 0.0) for m in metrics) == \
            sum(len(g.samples) for g in dropped)
        for version, groups in steps:
            assert all(version - g.version <= 1 for g in groups)
        assert all(m["rollout/staleness_versions"] <= 1 for m in metrics)
        assert max(m["rollout/staleness_versions"] for m in metrics) == 1  # it really sampled ahead
        assert all("rollout/queue_depth" in m and m["sync/seconds"] > 0 for m in metrics)
        # a background fetch is seen to finish at the next step's stage: its time is reported then
        assert any(m.get("sync/fetch_seconds", -1.0) >= 0 for m in metrics[1:])
        counts = Counter(s.rollout.group_id for g in taken for s in g.samples)
        assert set(counts.values()) == {driver.cfg.generation.samples_per_prompt}
    finally:
        del driver.fleet.launch
        for _, _, inflight in driver.stream.inflight:
            driver.fleet.collect(inflight)
        driver.stream, driver.cfg.algorithm.max_staleness = None, 0
        synced = driver.sync()  # every actor on the latest version again, for the tests after
    assert synced["sync/fetch_seconds"] <= synced["sync/load_seconds"]  # the slowest fetch, and fetch + load


def test_streaming_dynamic_sampling_stops_drawing_at_the_cap(driver):
    """Streaming with DAPO's filter: groups whose rewards are all equal are not admitted; once
    max_extra_prompts_per_step of them were refused, the step takes what the buffer holds instead of waiting."""
    from cluster.rollout_buffer import RolloutBuffer
    from cluster.stream import RolloutStream

    def uniform_score(rollouts):  # every group scores alike: no group has a signal
        scored, stats = driver.score(rollouts)
        return [s.__class__(s.rollout, 0.0, s.components) for s in scored], stats

    buffer = RolloutBuffer(capacity=24, max_staleness=1, filters=("uniform",))
    stream = RolloutStream(driver.fleet, buffer, driver.next_prompts, uniform_score, chunk=6, max_filtered=12)
    started = time.monotonic()
    groups, metrics = stream.take(12, driver.store.latest_version, timeout_s=120)
    assert groups == [] and time.monotonic() - started < 60
    assert metrics["rollout/filtered_total{reason=uniform}"] >= 12
    for _, _, launch in stream.inflight:
        driver.fleet.collect(launch)


def test_streaming_buffer_fills_when_the_filter_refuses_some_groups(driver):
    """Filters admit fewer groups than were launched, so the buffer's room stops being a multiple of the chunk:
    the stream launches smaller chunks instead of stalling (it once spun here forever)."""
    from cluster.rollout_buffer import RolloutBuffer
    from cluster.stream import RolloutStream

    def half_uniform(rollouts):  # odd groups score alike (refused), even groups differ (admitted)
        scored, stats = driver.score(rollouts)
        return [s.__class__(s.rollout, 0.0 if s.rollout.group_id % 2 else float(i % 2), s.components)
                for i, s in enumerate(scored)], stats

    buffer = RolloutBuffer(capacity=12, max_staleness=1, filters=("uniform",))
    stream = RolloutStream(driver.fleet, buffer, driver.next_prompts, half_uniform, chunk=8, max_filtered=1000)
    groups, metrics = stream.take(12, driver.store.latest_version, timeout_s=120)
    assert len(groups) == 12 and metrics["rollout/filtered_total{reason=uniform}"] >= 6
    for _, _, launch in stream.inflight:
        driver.fleet.collect(launch)


def test_streaming_run_evaluates_beside_the_loop(driver, tmp_path):
    """Streaming: held-out evaluations run in a driver thread while the loop trains on; each is logged at the
    step it evaluated, after the loop has gone on (eval/lag_steps), and the run's history keeps step order."""
    cfg = driver.cfg
    saved = (cfg.algorithm.max_staleness, cfg.train.steps, cfg.train.eval_every, cfg.train.run_dir, driver.run_dir)
    cfg.algorithm.max_staleness, cfg.train.eval_every, cfg.train.steps = 1, 4, driver.step + 13
    driver.run_dir = tmp_path / "bg"
    cfg.train.run_dir = str(driver.run_dir)
    driver.stream = driver._build_stream()
    try:
        summary = driver.run()
    finally:
        for _, _, launch in driver.stream.inflight:
            driver.fleet.collect(launch)
        driver.stream = None
        cfg.algorithm.max_staleness, cfg.train.steps, cfg.train.eval_every, cfg.train.run_dir, driver.run_dir = saved
        driver.sync()
    rows = [json.loads(line) for line in (tmp_path / "bg" / "metrics.jsonl").read_text().splitlines()]
    background = [r for r in rows if "eval/lag_steps" in r]
    assert background, "no evaluation ran in the background"
    for r in background:
        assert r["step"] % 4 == 0 and r["eval/lag_steps"] >= 1 and 0 <= r["eval/task_score"] <= 1
        trained_later = [x["step"] for x in rows[:rows.index(r)] if "system/step_seconds" in x]
        assert max(trained_later) > r["step"]  # the loop trained past the evaluated step before it was logged
    steps = [s for s, _ in driver.evals]
    assert steps == sorted(steps) and steps[-1] == summary["steps"]


def test_weights_swapped_in_between_requests_match_the_learner(driver):
    """Hidden sync: an actor fetches a new version while it generates; the request in flight finishes with
    the old weights, the next one starts with the new, and vLLM's logprobs then equal the learner's."""
    actor = handle(driver, 0)
    old = ray.get(actor.health.remote(), timeout=30)["policy_version"]
    one_training_step(driver)
    version, ref, _ = driver.learner.publish()
    driver.store.add(version, ref[0])
    _, prompts = driver.next_prompts(12)
    busy = actor.generate.remote(prompts * 60, 8)  # seconds of sampling: in flight while the fetch runs
    time.sleep(0.5)
    staged = actor.stage_weights.options(concurrency_group="weights").remote(version, ref)
    fetch = ray.get(staged, timeout=60)
    assert not ray.wait([busy], timeout=0)[0]  # the fetch finished while the generate call still ran
    in_flight = ray.get(busy, timeout=300)
    assert fetch["sync/fetch_seconds"] >= 0
    assert {r.policy_version for r in in_flight.rollouts} == {old}  # fetched beside it, not swapped into it
    after = ray.get(actor.generate.remote(prompts[:2], 2), timeout=60)
    assert {r.policy_version for r in after.rollouts} == {version} and after.swap_seconds > 0
    assert_close(vllm_logprobs(actor), learner_logprobs(driver))
    driver.sync()


def test_request_waits_for_a_version_being_fetched(driver):
    """A request that starts while a newer version is still being fetched in the background waits for it and
    samples with it: no rollout is sampled by weights already on their way out (it could be dropped as stale)."""
    one_training_step(driver)
    version, ref, _ = driver.learner.publish()
    driver.store.add(version, ref[0])
    _, prompts = driver.next_prompts(2)

    def probe(actor):
        import threading

        fetch = actor._fetch

        def slow(*args):  # one machine's object store answers in ms; a large model's fetch takes seconds
            time.sleep(1.0)
            return fetch(*args)

        actor._fetch = slow
        try:
            staging = threading.Thread(target=actor.stage_weights, args=(version, ref))
            staging.start()
            time.sleep(0.2)  # the fetch is under way
            start = time.perf_counter()
            out = actor.generate(prompts, 2)
            waited = time.perf_counter() - start
            staging.join()
        finally:
            del actor._fetch
        return {r.policy_version for r in out.rollouts}, waited

    versions, waited = ray.get(handle(driver, 0).__ray_call__.remote(probe), timeout=120)
    assert versions == {version} and waited >= 0.5
    driver.sync()


def test_partial_rollouts_swap_mid_response_and_record_token_versions(driver):
    """Partial rollouts: a version staged while an actor samples is swapped in between segments, and the unfinished
    samples continue from their prefix under it. Each token records the version that sampled it, and the tokens
    sampled after the swap carry the learner's logprobs (within 1e-4): the prefix was recomputed by the new weights."""
    cfg = driver.cfg.generation.model_copy(update={"partial_rollouts": True, "partial_segment_tokens": 1})
    actor = driver.fleet._cls.remote(cfg, driver.fleet.policy_path, driver.fleet.dtype, 9, 0)  # at version 0
    try:
        assert ray.get(actor.health.remote(), timeout=300)["block_size"] == 32  # a prefix is cached to its last block
        assert ray.get(handle(driver, driver.fleet.live[0].slot).health.remote(), timeout=30)["block_size"] == 128
        one_training_step(driver)
        version, ref, _ = driver.learner.publish()
        driver.store.add(version, ref[0])
        _, prompts = driver.next_prompts(12)
        busy = actor.generate.remote(prompts * 40, 4)  # 1,920 samples, one token per segment
        time.sleep(0.5)
        ray.get(actor.stage_weights.options(concurrency_group="weights").remote(version, ref), timeout=60)
        rollouts = ray.get(busy, timeout=300).rollouts
        for r in rollouts:
            assert len(r.token_versions) == len(r.response_ids) and r.token_versions == sorted(r.token_versions)
            assert r.policy_version == min(r.token_versions)  # the staleness bound reads the oldest token
        assert {v for r in rollouts for v in r.token_versions} == {0, version}
        mixed = [r for r in rollouts if len(set(r.token_versions)) > 1]
        assert mixed, "the swap landed between whole responses, not inside one"
        for r in mixed[:8]:
            learner = driver.learner.sequence_logprobs(r.prompt_ids, r.response_ids)
            after = [i for i, v in enumerate(r.token_versions) if v == version]
            assert_close([r.sampling_logprobs[i] for i in after], [learner[i] for i in after])
    finally:
        ray.kill(actor)
    driver.sync()


def test_dynamic_sampling_draws_prompts_until_groups_differ(driver):
    """DAPO dynamic sampling: a batch whose groups all scored alike is topped up with fresh prompts (at most
    max_extra_prompts_per_step); only groups whose rewards differ are trained on, prompts_per_step at most."""
    _, prompts = driver.next_prompts()
    rollouts, _ = driver.fleet.generate(prompts)
    scored, _ = driver.score(rollouts)
    uniform = [s.__class__(s.rollout, 0.0, s.components) for s in scored]  # no group has a signal
    alg = driver.cfg.algorithm
    alg.max_extra_prompts_per_step = 24
    try:
        kept, extra = driver._dynamic_sampling(uniform, step=1)
    finally:
        alg.max_extra_prompts_per_step = 64
    assert 0 < extra <= 24
    groups = Counter(s.rollout.group_id for s in kept)
    assert len(groups) <= driver.cfg.train.prompts_per_step
    assert all(g >= len(prompts) for g in groups)  # the uniform first batch contributed nothing
    for g in groups:
        assert len({s.reward for s in kept if s.rollout.group_id == g}) > 1


def test_in_line_evaluation_that_meets_lost_weights_restores_the_learner(driver, tmp_path, monkeypatch):
    """On-policy, the evaluation runs in line: if its launch waits for an actor whose catch-up meets a version lost
    with its learner (``WeightsLost``), the run restores the learner from its last checkpoint, as for a learner
    that died in a step, redoes the steps since, and finishes."""
    cfg = driver.cfg
    saved = (cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.train.run_dir, driver.run_dir,
             driver.last_checkpoint)
    target = driver.step + 4
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = target, 1, 1
    driver.run_dir = tmp_path / "lost"
    cfg.train.run_dir = str(driver.run_dir)
    driver.last_checkpoint = None  # an earlier test's run left its own (another run directory)
    evaluate, calls, lines = driver.evaluate, [], []

    def evaluate_once_lost():
        calls.append(driver.step)
        if driver.last_checkpoint is not None and len(calls) == 3:  # the second in-line one, after a checkpoint
            raise WeightsLost("version 7 was lost with the learner that published it")
        return evaluate()

    monkeypatch.setattr(driver, "evaluate", evaluate_once_lost)
    monkeypatch.setattr(driver, "log", lines.append)
    restores = driver.learner_restores
    try:
        summary = driver.run()
    finally:
        (cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.train.run_dir, driver.run_dir,
         driver.last_checkpoint) = saved
        monkeypatch.undo()
        driver.sync()
    assert summary["steps"] == target and summary["learner_restores"] == restores + 1, lines
    assert any("version 7 was lost" in line and "restoring it from" in line for line in lines), lines
    assert calls[3] == calls[2]  # the step whose evaluation failed was trained again from its checkpoint, evaluated
    rows = [json.loads(line) for line in (tmp_path / "lost" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["step"] for r in rows if "reward/mean" in r]
    assert trained == list(range(target - 3, target + 1))  # each step logged once, in order, none lost


def test_final_evaluation_that_meets_lost_weights_stops_naming_the_last_checkpoint(driver, tmp_path, monkeypatch):
    """The final evaluation runs after the loop: a ``WeightsLost`` there stops the run with a RunError that says
    what to do (here, with no checkpoint written, start again; else resume from the one it names), not a traceback."""
    cfg = driver.cfg
    saved = (cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.checkpoint.every_s, cfg.train.run_dir,
             driver.run_dir, driver.last_checkpoint)
    first = driver.step
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.checkpoint.every_s = first + 1, 100000, 0, None
    driver.run_dir = tmp_path / "final"
    cfg.train.run_dir = str(driver.run_dir)
    driver.last_checkpoint = None
    evaluate = driver.evaluate

    def lost_at_the_end():
        if driver.step > first:
            raise WeightsLost("version 9 was lost with the learner that published it")
        return evaluate()

    monkeypatch.setattr(driver, "evaluate", lost_at_the_end)
    try:
        with pytest.raises(RunError, match=r"before the final evaluation \(version 9 was lost.*\); no checkpoint was "
                                           r"written: start the run again$"):
            driver.run()
    finally:
        (cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every, cfg.checkpoint.every_s, cfg.train.run_dir,
         driver.run_dir, driver.last_checkpoint) = saved
        monkeypatch.undo()
        driver.sync()
    assert driver.step == first + 1
