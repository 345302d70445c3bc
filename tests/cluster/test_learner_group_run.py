"""The driver with a learner group on a real local Ray: two FSDP ranks (gloo) beside a vLLM actor, then LoRA.

- After a step and a sync, vLLM's logprobs equal the group's (the gathered, published weights load as-is).
- A rank killed mid-run fails the step with a message naming it; the whole group is rebuilt from the last
  checkpoint and the run goes on.
- LoRA: the actors receive the merged weights, and vLLM's logprobs equal the learner's.
"""

from __future__ import annotations

import pytest
import ray

from cluster.config import load_config
from cluster.driver import Driver, LearnerDied, resolve_policy
from cluster.resources import check_resources

PROBE = ([1, 2, 3], [4, 5, 6, 7])


def _driver(tmp_path_factory, overrides: list[str]) -> Driver:
    cfg = load_config(overrides=[
        "sft.steps=30", "generation.num_actors=1", "generation.num_cpus=1", "learner.num_cpus=0.5",
        "generation.torch_threads=1", "learner.torch_threads=1", "train.prompts_per_step=8",
        "train.eval_prompts=20", "generation.samples_per_prompt=4", "learner.lr=1e-3",
        f"train.run_dir={tmp_path_factory.mktemp('run')}", "metrics.progress=false", "metrics.prometheus=false",
        "reward.http_enabled=false", "model.cache_dir=.relay_cache", *overrides,
    ])
    check_resources(cfg)
    d = Driver(cfg, resolve_policy(cfg))
    d.start()
    return d


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _step_and_sync(d: Driver) -> None:
    rollouts, _ = d.fleet.generate(d.next_prompts()[1])
    scored, _ = d.score(rollouts)
    scored = [s.__class__(s.rollout, float(i % 2), s.components) for i, s in enumerate(scored)]  # never uniform
    assert d.learner.train_step(scored)["learner/kept_fraction"] == 1.0
    d.sync()


def _assert_vllm_matches_learner(d: Driver) -> None:
    member = d.fleet.live[0]
    ours = d.learner.sequence_logprobs(*PROBE)
    theirs = ray.get(member.handle.sequence_logprobs.remote(*PROBE), timeout=60)
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4, (ours, theirs)


def test_fsdp_group_syncs_and_survives_a_dead_rank(local_ray, tmp_path_factory):
    d = _driver(tmp_path_factory, ["learner.num_workers=2", "learner.strategy=fsdp"])
    try:
        assert len(d.learner.actors) == 2
        before = ray.get(d.fleet.live[0].handle.sequence_logprobs.remote(*PROBE), timeout=60)
        _step_and_sync(d)
        after = ray.get(d.fleet.live[0].handle.sequence_logprobs.remote(*PROBE), timeout=60)
        assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-4  # the weights did change
        _assert_vllm_matches_learner(d)

        d.step = 1
        d.checkpoint("step-1")
        ray.kill(d.learner.actors[1], no_restart=True)
        with pytest.raises(LearnerDied, match=r"learner rank 1 of 2 died"):
            d._learner_call(d.learner.publish)
        assert d._guarded_step() is None  # the step failed, the group was rebuilt from step-1
        assert d.learner_restores == 1 and d.step == 1 and len(d.learner.actors) == 2
        assert d._guarded_step() is not None  # and the run goes on
        _assert_vllm_matches_learner(d)
    finally:
        d.learner.kill()
        d.shutdown()


def test_lora_actors_receive_merged_weights(local_ray, tmp_path_factory):
    d = _driver(tmp_path_factory, ["learner.lora.r=8", "learner.lora.alpha=16", "learner.lr=1e-2"])
    try:
        _step_and_sync(d)
        _step_and_sync(d)
        _assert_vllm_matches_learner(d)
    finally:
        d.learner.kill()
        d.shutdown()
