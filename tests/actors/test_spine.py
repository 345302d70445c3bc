"""The actor-learner spine on a real local Ray: vLLM actors, Serve reward, learner, object-store sync.

One driver with two generation actors is shared by the module (engine start costs ~20 s each).
"""

from __future__ import annotations

from collections import Counter, deque

import pytest
import ray

from cluster.config import load_config
from cluster.driver import Driver, Fleet, resolve_policy
from cluster.resources import check_resources

PROBE = ([1, 2, 3], [4, 5, 6, 7])  # a fixed token sequence: prompt ids, response ids


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cfg = load_config(overrides=[
        "sft.steps=30", "generation.num_actors=2", "generation.num_cpus=0.5", "learner.num_cpus=0.5",
        "generation.torch_threads=1",  # two engines share the 2 cores
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
    return ray.get(d.learner.sequence_logprobs.remote(*PROBE), timeout=60)


def assert_close(a, b, tol=1e-4):
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tol, (a, b)


def one_training_step(d):
    rollouts, _ = d.generate(d.next_prompts())
    scored, _ = d.score(rollouts)
    # Guarantee a non-uniform group so the update really changes the weights.
    scored = [s.__class__(s.rollout, float(i % 2), s.components) for i, s in enumerate(scored)]
    return ray.get(d.learner.train_step.remote(scored), timeout=300)


@pytest.mark.parametrize("n_actors", [1, 2])
def test_every_prompt_sampled_exactly_once_per_step(driver, n_actors):
    full = driver.fleet
    driver.fleet = Fleet(full.actors[:n_actors], full.timeout_s, full.versions[:n_actors])
    try:
        prompts = driver.next_prompts()
        rollouts, _ = driver.generate(prompts)
    finally:
        driver.fleet = full
    per_group = Counter(r.group_id for r in rollouts)
    k = driver.cfg.generation.samples_per_prompt
    assert per_group == {p.index: k for p in prompts}
    assert {r.actor_id for r in rollouts} == set(range(n_actors))
    for r in rollouts:
        assert len(r.sampling_logprobs) == len(r.response_ids) > 0
        assert r.metadata["answer"] and r.policy_version == driver.fleet.versions[r.actor_id]


def test_vllm_matches_learner_after_sync(driver):
    stats = one_training_step(driver)
    assert stats["learner/kept_fraction"] > 0
    before = vllm_logprobs(driver.fleet.actors[0])
    sync = driver.sync()
    assert sync["sync/bytes"] > 1e6 and sync["sync/seconds"] > 0
    after = vllm_logprobs(driver.fleet.actors[0])
    reference = learner_logprobs(driver)
    assert max(abs(x - y) for x, y in zip(before, after, strict=True)) > 1e-4  # the weights did change
    for actor in driver.fleet.actors:
        assert_close(vllm_logprobs(actor), reference)


def test_actor_that_missed_versions_catches_up_from_latest_ref(driver):
    lagging = driver.fleet.actors[1]
    version_before = ray.get(lagging.health.remote(), timeout=30)["policy_version"]
    for _ in range(2):  # two versions published, only actor 0 loads them
        one_training_step(driver)
        version, ref, _ = ray.get(driver.learner.publish.remote(), timeout=60)
        driver.store.add(version, ref[0])
        ray.get(driver.fleet.actors[0].update_weights.remote(version, ref), timeout=60)
    assert ray.get(lagging.health.remote(), timeout=30)["policy_version"] == version_before
    driver._catch_up(1)
    assert ray.get(lagging.health.remote(), timeout=30)["policy_version"] == driver.store.latest_version
    assert_close(vllm_logprobs(lagging), learner_logprobs(driver))


def test_run_survives_a_crashed_generation_actor(driver):
    one_training_step(driver)
    driver.sync()
    victim = driver.fleet.actors[1]
    pid = ray.get(victim.health.remote(), timeout=30)["pid"]
    ray.kill(victim, no_restart=False)  # the process dies; Ray restarts it (max_restarts)
    prompts = driver.next_prompts()
    rollouts, _ = driver.generate(prompts)
    assert len(rollouts) == len(prompts) * driver.cfg.generation.samples_per_prompt
    assert driver.restarts == 1
    health = ray.get(victim.health.remote(), timeout=30)
    assert health["pid"] != pid and health["policy_version"] == driver.store.latest_version
    assert_close(vllm_logprobs(victim), learner_logprobs(driver))


def test_greedy_evaluation_is_deterministic(driver):
    a, b = driver.evaluate(), driver.evaluate()
    assert a["eval/task_score"] == b["eval/task_score"] and 0.0 <= a["eval/task_score"] <= 1.0


def test_actors_run_one_version_ahead_with_max_staleness_1(driver):
    driver.cfg.algorithm.max_staleness = 1
    try:
        inflight, version, staleness = deque(), driver.store.latest_version, []
        for _ in range(3):
            metrics = driver._step(version, inflight)
            staleness.append(metrics["rollout/staleness_versions"])
            version = driver.store.latest_version
        assert staleness == [0.0, 1.0, 1.0]  # the first batch was sampled before any update
        assert len(inflight) == 1  # one generation runs ahead
        driver.collect(inflight.popleft())
    finally:
        driver.cfg.algorithm.max_staleness = 0
