"""The PPO critic and algorithm switching through the Learner class, without Ray.

A tiny randomly initialised Qwen2 (the embedded architecture, 2 layers) stands in for the policy;
rollouts are built by hand so the tests need neither vLLM nor the reward service.
"""

from __future__ import annotations

import math

import pytest
import torch

from cluster.config import load_config
from learner import algos, losses
from learner.batch import collate
from learner.bootstrap import TinyModelConfig, build_tiny_model, build_tokenizer
from learner.critic import Critic
from learner.distributed import Collective
from tests.learner.rollouts import scored_rollouts


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.set_num_threads(1)  # two threads crawl when other processes share this machine's 2 cores
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy")
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelConfig(num_layers=2, intermediate_size=256))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)




def test_critic_value_loss_falls_on_a_fixed_batch(policy_dir):
    torch.manual_seed(0)
    cfg = load_config(None, ["learner.critic_lr=1e-3", "learner.micro_batch_tokens=512", "learner.minibatch_size=16"])
    critic = Critic.build(_fake_policy(), policy_dir, cfg.learner, torch.float32)
    critic.make_optimizer()
    batch = collate(scored_rollouts(), pad_id=0)
    mask = batch.response_mask
    returns = algos.place_reward_on_last_token(batch.rewards, mask)
    returns = algos.discounted_returns(returns, mask, gamma=1.0)  # (B, T) the reward at every response position
    norm = {"value_tokens": float(mask.sum()), "rows": float(len(batch))}
    halves = list(torch.arange(len(batch)).chunk(2))  # two micro-batches: the loss is still the token mean of all
    value_losses, variances = [], []
    for _ in range(15):
        old = critic.values(batch, "cpu").detach()  # re-anchored each step, as each train_step does
        stats = critic.update(batch.with_fields(values=old, returns=returns), halves, norm, cfg.algorithm,
                              Collective(), None)
        value_losses.append(stats["learner/value_loss"])
        variances.append(losses.explained_variance(old, returns, mask).item())
    assert value_losses[-1] < 0.5 * value_losses[0], value_losses
    assert variances[-1] > variances[0]
    assert all(math.isfinite(x) for x in value_losses)


def _fake_policy():
    policy = torch.nn.Linear(1, 1)  # only .config.hidden_size and .device are read
    policy.config = type("C", (), {"hidden_size": 128})()
    policy.device = torch.device("cpu")
    return policy


def test_critic_from_a_reward_model_starts_at_its_scores(policy_dir, tmp_path):
    """InstructGPT's init: V at the last answer token equals the reward model's score of the text."""
    from reward_service.models import RewardModel

    torch.manual_seed(1)
    rm = RewardModel.from_backbone(policy_dir, max_length=32)
    torch.nn.init.normal_(rm.head.weight, std=0.5)
    torch.nn.init.constant_(rm.head.bias, -2.0)
    rm.save_pretrained(tmp_path / "rm")
    cfg = load_config(None, [f"learner.critic_init={tmp_path / 'rm'}"])
    critic = Critic.build(_fake_policy(), policy_dir, cfg.learner, torch.float32)
    scored = scored_rollouts(n_prompts=2, samples=3)
    values = critic.values(collate(scored, pad_id=0), "cpu")  # (B, T)
    expected, _ = rm.eval().score([s.rollout.prompt_text + s.rollout.response_text for s in scored])
    for i, s in enumerate(scored):
        last_answer_token = len(s.rollout.prompt_ids) + len(s.rollout.response_ids) - 2  # before the EOS
        assert values[i, last_answer_token].item() == pytest.approx(expected[i], abs=1e-4)
    assert len({round(x, 3) for x in expected}) > 1  # not a constant head


def test_critic_init_with_another_tokenizer_is_refused(policy_dir):
    from reward_service.config import default_backbone_path

    cfg = load_config(None, [f"learner.critic_init={default_backbone_path()}"])
    with pytest.raises(ValueError, match="another tokenizer than the policy"):
        Critic.build(_fake_policy(), policy_dir, cfg.learner, torch.float32)
    with pytest.raises(Exception, match="learner.critic_init '/no/such/dir' is not a directory"):
        load_config(None, ["learner.critic_init=/no/such/dir"])


@pytest.mark.parametrize("name", ["ppo", "grpo", "drgrpo", "rloo", "reinforce", "reinforce_pp",
                                  "reinforce_pp_baseline"])
def test_algorithm_switch_runs_a_learner_step(policy_dir, name):
    from learner.learner import Learner

    torch.manual_seed(0)
    overrides = [f"algorithm.name={name}", "learner.warmup_steps=0", "learner.lr=1e-3",
                 "learner.minibatch_size=8", "learner.micro_batch_tokens=256"]
    if name in ("ppo", "reinforce_pp", "reinforce_pp_baseline"):  # REINFORCE++ puts the KL in the reward too
        overrides += ["algorithm.kl_in=reward", "algorithm.kl_target=0.01", "algorithm.kl_coef=0.1",
                      "algorithm.kl_horizon=16"]
    learner = Learner.from_config(load_config(None, overrides), policy_dir)
    scored = scored_rollouts()
    before = [p.detach().clone() for p in learner.policy.parameters()]
    first = learner.train_step(scored)
    second = learner.train_step(scored)
    for stats in (first, second):
        assert all(math.isfinite(v) for v in stats.values()), stats
        assert stats["learner/kept_fraction"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))
    if name == "ppo":
        for key in ("learner/value_loss", "learner/explained_variance", "learner/value_clip_fraction",
                    "learner/kl", "learner/kl_coef"):
            assert key in second
        assert second["learner/kl"] > 0  # the policy moved away from the reference in step 1
        assert second["learner/kl_coef"] != pytest.approx(0.1, rel=1e-3)  # the adaptive controller moved
    else:
        assert "learner/value_loss" not in second


def test_critic_warmup_holds_the_policy_while_the_critic_learns(policy_dir):
    from learner.learner import Learner

    torch.manual_seed(0)
    learner = Learner.from_config(load_config(None, [
        "algorithm.name=ppo", "learner.warmup_steps=0", "learner.lr=1e-3", "learner.minibatch_size=8",
        "learner.micro_batch_tokens=256", "learner.critic_warmup_steps=2"]), policy_dir)
    scored = scored_rollouts()

    def snapshot():
        return ([p.detach().clone() for p in learner.policy.parameters()],
                [p.detach().clone() for p in learner.critic.parameters()])

    def moved(before, after):
        return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))

    for version in (0, 1):  # versions published so far: below critic_warmup_steps, the policy is held
        learner.set_version(version)
        policy, critic = snapshot()
        stats = learner.train_step(scored)
        assert stats["learner/critic_warmup"] == 1.0 and "learner/value_loss" in stats
        assert not moved(policy, learner.policy.parameters()) and moved(critic, learner.critic.parameters())
    learner.set_version(2)
    policy, _ = snapshot()
    assert learner.train_step(scored)["learner/critic_warmup"] == 0.0
    assert moved(policy, learner.policy.parameters())


def test_shared_critic_learns_values_on_the_policy_backbone(policy_dir, tmp_path):
    """critic_backbone=shared: no second model; the value head reads the policy's hidden states, its loss
    falls on a fixed batch, and the joint loss moves the policy."""
    from learner.learner import Learner

    torch.manual_seed(0)
    cfg = load_config(None, ["algorithm.name=ppo", "learner.critic_backbone=shared", "learner.critic_head_lr=1e-2",
                             "learner.warmup_steps=0", "learner.micro_batch_tokens=512", "learner.minibatch_size=16"])
    learner = Learner.from_config(cfg, policy_dir)
    assert learner.critic is None and learner.value_head is not None
    scored = scored_rollouts()
    before = [p.detach().clone() for p in learner.policy.parameters()]
    stats = [learner.train_step(scored) for _ in range(12)]
    value_losses = [s["learner/value_loss"] for s in stats]
    assert value_losses[-1] < 0.5 * value_losses[0], value_losses
    assert stats[-1]["learner/explained_variance"] > stats[0]["learner/explained_variance"]
    assert all(math.isfinite(v) for s in stats for v in s.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))
    learner.save(str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "value_head.pt").is_file() and not (tmp_path / "ck" / "critic").exists()
    with pytest.raises(Exception, match="critic_init applies to a separate critic"):
        load_config(None, ["learner.critic_backbone=shared", f"learner.critic_init={tmp_path}"])


@pytest.mark.parametrize("overrides", [
    ["algorithm.policy_loss=gspo", "algorithm.clip_low=0.0003", "algorithm.clip_high=0.0004",
     "algorithm.loss_agg=seq-mean-token-mean"],
    ["algorithm.policy_loss=gspo_token"],
    ["algorithm.policy_loss=cispo", "algorithm.clip_high=4.0"],
    ["algorithm.rollout_correction=seq_tis"],
    ["algorithm.rollout_correction=masked_is"],
    ["algorithm.rollout_correction=none", "algorithm.tis_cap=null"],
    ["algorithm.mask_truncated=true", "algorithm.clip_high=0.28"],
], ids=lambda o: " ".join(x.split(".")[1] for x in o))
def test_objectives_run_a_learner_step(policy_dir, overrides):
    """Each policy loss and rollout correction, chosen by name in the config, updates the policy."""
    from learner.learner import Learner

    torch.manual_seed(0)
    cfg = load_config(None, ["learner.warmup_steps=0", "learner.lr=1e-3", *overrides])
    learner = Learner.from_config(cfg, policy_dir)
    before = [p.detach().clone() for p in learner.policy.parameters()]
    stats = learner.train_step(scored_rollouts())
    assert all(math.isfinite(v) for v in stats.values()), stats
    assert 0.0 <= stats["learner/corrected_fraction"] <= 1.0 and stats["learner/logprob_gap_mean"] >= 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters(), strict=True))
