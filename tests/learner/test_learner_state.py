"""The learner's state, without Ray: ``save`` then ``load_state`` continue a run exactly, the seed fixes its
RNGs, and non-finite steps are skipped, counted and, after ``learner.max_bad_steps`` in a row, stop the run.

A tiny random Qwen2 (1 layer, width 64) and hand-made rollouts, as in test_critic.py (its helpers are
module-local, so the few lines needed are repeated here).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cluster.config import load_config
from core.records import ScoredRollout
from learner.learner import Learner, NonFiniteError
from tests.learner.conftest import save_tiny_policy
from tests.learner.rollouts import scored_rollouts

# Several minibatches per step and two epochs, so the minibatch order (torch's RNG) changes the result; warmup
# longer than the test, so the LR schedule's position matters; a large LR, so Adam's moments do.
BASE = ["learner.lr=1e-2", "learner.warmup_steps=20", "learner.torch_threads=1", "learner.epochs=2",
        "learner.minibatch_size=8", "learner.micro_batch_tokens=256"]
GRPO = ["algorithm.name=grpo", "algorithm.kl_in=loss", "algorithm.kl_coef=0.1"]  # the reference counts too
PPO = ["algorithm.name=ppo", "learner.critic_backbone=separate", "learner.critic_lr=1e-2", "algorithm.kl_in=reward",
       "algorithm.kl_target=0.001", "algorithm.kl_coef=0.1", "algorithm.kl_horizon=16"]  # the KL coefficient moves


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    torch.set_num_threads(1)  # the learner sets learner.torch_threads=1 too: same arithmetic in every learner
    return save_tiny_policy(tmp_path_factory.mktemp("policy"), num_layers=1)




BATCHES = [scored_rollouts(seed=seed) for seed in range(3)]


def _learner(overrides: list[str], path: str, reference: str | None = None, seed: int = 0) -> Learner:
    """A learner as the driver builds it (``Driver._start_learner``): ``reference`` stays the run's start."""
    cfg = load_config(None, [*BASE, *overrides])
    return Learner(path, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                   cfg.generation.max_tokens, reference_path=reference, seed=seed)


def _params(learner: Learner) -> torch.Tensor:
    """Every trained weight (policy, and critic if any), flattened into one ``(N,)`` copy."""
    models = [learner.policy] + ([learner.critic] if learner.critic is not None else [])
    return torch.cat([p.detach().flatten() for m in models for p in m.parameters()])


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _comparable(stats: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in stats.items() if not k.startswith("learner/step_seconds")}


# ---- exact continuation ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [GRPO, PPO], ids=["grpo", "ppo-separate-critic"])
def test_save_then_load_state_continues_exactly(policy_dir, tmp_path, overrides):
    """Learner A trains steps 1-3 and is saved after step 1; learner B starts from that checkpoint (the
    reference staying the run's start, as on a resume) and trains steps 2-3: both end in the same place."""
    ckpt = str(tmp_path / "step_1")
    a = _learner(overrides, policy_dir, seed=3)
    stats_a = []
    for step, batch in enumerate(BATCHES, start=1):
        stats_a.append(_comparable(a.train_step(batch)))
        a.set_version(step)  # what publish does, without Ray
        if step == 1:
            a.save(ckpt)
            saved = a.state()
    final_a = _params(a)

    b = _learner(overrides, ckpt, reference=policy_dir, seed=3)
    assert b.load_state(ckpt) == 1
    assert b.state() == saved
    stats_b = [_comparable(b.train_step(batch)) for batch in BATCHES[1:]]

    assert _max_diff(final_a, _params(b)) <= 1e-6
    assert stats_b == [pytest.approx(s, rel=1e-6, abs=1e-6) for s in stats_a[1:]]
    assert _max_diff(final_a, _params(_learner(overrides, policy_dir, seed=3))) > 1e-3  # it did learn
    if "algorithm.name=ppo" in overrides:
        assert saved["kl_coef"] != pytest.approx(0.1)  # the adaptive controller's value was what came back
        assert b.state()["kl_coef"] == pytest.approx(a.state()["kl_coef"], rel=1e-9)


def test_kl_coefficient_version_and_bad_step_count_survive_save(policy_dir, tmp_path):
    a = _learner(PPO, policy_dir)
    a.kl_ctl.value, a.bad_steps = 0.0375, 2
    a.set_version(41)
    a.save(str(tmp_path / "ckpt"))
    b = _learner(PPO, str(tmp_path / "ckpt"), reference=policy_dir)
    assert b.state() == {"version": 0, "kl_coef": 0.1}
    assert b.load_state(str(tmp_path / "ckpt")) == 41
    assert b.state() == {"version": 41, "kl_coef": 0.0375} and b.bad_steps == 2


# ---- the seed ---------------------------------------------------------------------------------------


def test_the_seed_fixes_the_minibatch_order(policy_dir):
    def run(seed: int) -> tuple[torch.Tensor, list[dict[str, float]]]:
        learner = _learner(GRPO, policy_dir, seed=seed)
        stats = [_comparable(learner.train_step(batch)) for batch in BATCHES[:2]]
        return _params(learner), stats

    params_1, stats_1 = run(seed=1)
    params_1_again, stats_1_again = run(seed=1)
    params_2, _ = run(seed=2)
    assert _max_diff(params_1, params_1_again) == 0.0
    assert stats_1 == stats_1_again
    assert _max_diff(params_1, params_2) > 1e-6  # another seed, another minibatch order, other weights


# ---- non-finite steps --------------------------------------------------------------------------------


def _with_nan_reward(batch: list[ScoredRollout]) -> list[ScoredRollout]:
    return [dataclasses.replace(s, reward=math.nan) if i == 0 else s for i, s in enumerate(batch)]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(policy_dir):
    """One sequence per minibatch: most minibatches miss the group with the NaN reward, and the step must not
    apply those either."""
    learner = _learner([*GRPO, "learner.max_bad_steps=2", "learner.minibatch_size=1", "learner.micro_batch_tokens=64"],
                       policy_dir)
    good, bad = BATCHES[0], _with_nan_reward(BATCHES[1])

    assert learner.train_step(good)["learner/bad_steps_total"] == 0.0
    before, schedule = _params(learner), learner.scheduler.last_epoch
    stats = learner.train_step(bad)
    assert stats["learner/bad_steps_total"] == 1.0
    assert _max_diff(before, _params(learner)) == 0.0  # no update at all, not even of the clean groups
    assert learner.scheduler.last_epoch == schedule

    assert learner.train_step(good)["learner/bad_steps_total"] == 0.0  # a good step resets the count...
    assert learner.bad_steps == 0
    last_good = _params(learner)
    assert _max_diff(before, last_good) > 0.0
    learner.train_step(bad)  # ...so this is the first bad step in a row, not the second
    with pytest.raises(NonFiniteError, match=r"not finite in 2 steps in a row \(learner.max_bad_steps=2\)"):
        learner.train_step(bad)
    assert _max_diff(last_good, _params(learner)) == 0.0


def test_a_non_finite_ppo_step_leaves_the_critic_alone(policy_dir):
    learner = _learner(PPO, policy_dir)
    learner.train_step(BATCHES[0])
    before = _params(learner)
    assert learner.train_step(_with_nan_reward(BATCHES[1]))["learner/bad_steps_total"] == 1.0
    assert _max_diff(before, _params(learner)) == 0.0
