"""A learner group of two ranks (gloo, on a real local Ray) takes the same step as one learner on the same batch.

One optimizer step per batch (minibatch = the batch), so the update does not depend on the minibatch order;
a small token budget, so each rank runs several micro-batches and, with five groups over two ranks, not
the same number (FSDP ranks pad with empty passes). GRPO with the KL in the loss, REINFORCE++ (whitened
over the whole batch: an all-reduce) and PPO with a separate critic and the KL controller.

The learning rate is small on purpose: Adam's first step moves every weight by lr * g / (|g| + eps), about
lr * sign(g), so a gradient entry that is 1e-8 in one summation order and -1e-8 in another moves by +-lr.
The gradients agree to rounding; at lr 1e-4 the weights move by 1e-4 and agree within 1e-5 (most within 1e-8).
"""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import load_file

from cluster.config import load_config
from learner.group import LearnerGroup, split_by_group
from learner.learner import Learner
from learner.weights import unpack_weights
from tests.learner.rollouts import scored_rollouts

BASE = ["learner.lr=1e-4", "learner.warmup_steps=0", "learner.torch_threads=1", "learner.micro_batch_tokens=24",
        "learner.num_cpus=1"]
CASES = {
    "grpo": ["algorithm.name=grpo", "algorithm.kl_in=loss", "algorithm.kl_coef=0.1"],
    "reinforce_pp": ["algorithm.name=reinforce_pp", "algorithm.kl_in=reward", "algorithm.kl_coef=0.05",
                     "algorithm.drop_uniform_groups=false"],
    "ppo": ["algorithm.name=ppo", "learner.critic_backbone=separate", "learner.critic_lr=1e-4",
            "algorithm.kl_in=reward", "algorithm.kl_target=0.01", "algorithm.kl_coef=0.1"],
}
BATCH = scored_rollouts(n_prompts=5, samples=4, seed=3)




@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _config(overrides: list[str]):
    return load_config(None, [*BASE, *overrides])


def _args(cfg, path: str) -> tuple:
    return (path, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature, cfg.generation.max_tokens)


def _checkpoint(path) -> dict[str, torch.Tensor]:
    out = {f"policy.{k}": v for k, v in load_file(f"{path}/model.safetensors").items()}
    if (path / "critic").is_dir():
        out.update({f"critic.{k}": v for k, v in load_file(f"{path}/critic/model.safetensors").items()})
        out.update({f"critic.head.{k}": v for k, v in torch.load(path / "critic" / "value_head.pt").items()})
    return out


def test_split_keeps_groups_whole_and_every_sample_once():
    shares = split_by_group(BATCH, 2)
    assert sorted(id(s) for share in shares for s in share) == sorted(id(s) for s in BATCH)
    owners = {s.rollout.group_id: r for r, share in enumerate(shares) for s in share}
    assert all(owners[s.rollout.group_id] == r for r, share in enumerate(shares) for s in share)
    assert {len(share) for share in shares} == {8, 12}  # five groups of four: three on one rank, two on the other


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_take_the_single_learners_step(case, strategy, policy_dir, local_ray, tmp_path):
    cfg = _config(CASES[case])
    torch.set_num_threads(1)
    single = Learner(*_args(cfg, policy_dir), reference_path=policy_dir)
    single_stats = single.train_step(BATCH)
    single.save(str(tmp_path / "single"))
    expected = dict(single.policy.named_parameters())

    cfg2 = _config([*CASES[case], "learner.num_workers=2", f"learner.strategy={strategy}"])
    group = LearnerGroup(cfg2.learner, _args(cfg2, policy_dir), {"reference_path": policy_dir})
    try:
        stats = group.train_step(BATCH)
        version, refs, _ = group.publish()
        published = dict(unpack_weights(ray.get(refs[0], timeout=60)))
        group.save(str(tmp_path / "group"))
        assert group.load_state(str(tmp_path / "group")) == version  # the gathered checkpoint loads into the ranks
    finally:
        group.kill()

    assert set(published) == set(expected)
    moved = max((expected[n] - p).abs().max().item() for n, p in dict(
        Learner(*_args(cfg, policy_dir)).policy.named_parameters()).items())
    assert moved > 5e-5  # the step changed the weights, so equality below says something
    for name, p in expected.items():
        torch.testing.assert_close(published[name], p.detach(), atol=1e-5, rtol=0, msg=name)
    ours, theirs = _checkpoint(tmp_path / "single"), _checkpoint(tmp_path / "group")
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(theirs[name], ours[name], atol=1e-5, rtol=0, msg=name)
    for key in ("learner/kl", "learner/advantage_std", "learner/policy_loss", "learner/value_loss",
                "learner/kept_fraction", "learner/kl_coef", "learner/tokens_trained_total"):
        if key in single_stats:
            assert stats[key] == pytest.approx(single_stats[key], abs=1e-5), key


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_rank_left_without_rows(strategy, policy_dir, local_ray):
    """Two groups, one scored alike: it is dropped, so one rank has no rows at all and runs empty passes."""
    from core.records import ScoredRollout

    rollouts = scored_rollouts(n_prompts=2, samples=4, seed=5)
    batch = [ScoredRollout(s.rollout, 0.0 if s.rollout.group_id == 0 else float(i % 2)) for i, s in
             enumerate(rollouts)]
    cfg = _config(CASES["grpo"])
    torch.set_num_threads(1)
    single = Learner(*_args(cfg, policy_dir), reference_path=policy_dir)
    expected_stats = single.train_step(batch)
    cfg2 = _config([*CASES["grpo"], "learner.num_workers=2", f"learner.strategy={strategy}"])
    group = LearnerGroup(cfg2.learner, _args(cfg2, policy_dir), {"reference_path": policy_dir})
    try:
        assert [len(share) for share in split_by_group(batch, 2)] == [4, 4]
        stats = group.train_step(batch)
        published = dict(unpack_weights(ray.get(group.publish()[1][0], timeout=60)))
    finally:
        group.kill()
    assert stats["learner/kept_fraction"] == expected_stats["learner/kept_fraction"] == 0.5
    assert stats["learner/policy_loss"] == pytest.approx(expected_stats["learner/policy_loss"], abs=1e-6)
    for name, p in single.policy.named_parameters():
        torch.testing.assert_close(published[name], p.detach(), atol=1e-5, rtol=0, msg=name)
