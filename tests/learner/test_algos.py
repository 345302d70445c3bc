"""Tests for learner/algos.py (the losses are in test_losses.py): hand-computed values, a second (loop) formulation
of every estimator, gradient checks, properties, and the textbook mistakes pinned."""

import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from learner import algos, losses
from tests.learner.tensors import GARBAGE, random_mask, t, with_garbage

pytestmark = pytest.mark.usefixtures("float64")  # the whole module (tests/learner/conftest.py)


ESTIMATORS = ["gae", "grpo", "drgrpo", "rloo", "reinforce"]


# ---------------------------------------------------------------------------- masked helpers

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
M = [[1, 1, 0], [1, 0, 0]]  # real values 1, 2, 4


def test_masked_sum_and_mean_hand_values():
    x, m = t(X), t(M)
    assert algos.masked_sum(x, m).item() == 7.0
    assert algos.masked_mean(x, m).item() == pytest.approx(7 / 3)
    assert algos.masked_sum(x, m, dim=-1).tolist() == [3.0, 4.0]
    assert algos.masked_mean(x, m, dim=-1).tolist() == [1.5, 4.0]
    assert algos.masked_mean(x, m.bool(), dim=0).tolist() == [2.5, 2.0, 0.0]  # empty column -> 0


def test_masked_var_and_whiten_hand_values():
    x, m = t(X), t(M)
    # deviations from 7/3: -4/3, -1/3, 5/3 -> squares sum to 42/9 = 14/3
    assert algos.masked_var(x, m).item() == pytest.approx(14 / 3 / 2)
    assert algos.masked_var(x, m, unbiased=False).item() == pytest.approx(14 / 9)
    w = algos.masked_whiten(x, m)
    std = math.sqrt(7 / 3)
    expected = [[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]]
    torch.testing.assert_close(w, t(expected))
    scaled = algos.masked_whiten(x, m, shift_mean=False)
    torch.testing.assert_close(scaled, torch.where(m.bool(), t(expected) + 7 / 3, 0.0))


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 5), length=st.integers(1, 6), seed=st.integers(0, 10_000),
    garbage=st.floats(-1e6, 1e6, allow_nan=False),
)
def test_masked_ops_ignore_values_under_the_mask(batch, length, seed, garbage):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.6
    mask[0, 0] = True
    y = torch.where(mask, x, garbage)
    for fn in (algos.masked_sum, algos.masked_mean):
        torch.testing.assert_close(fn(x, mask), fn(y, mask))
        torch.testing.assert_close(fn(x, mask, dim=-1), fn(y, mask, dim=-1))
    torch.testing.assert_close(algos.masked_var(x, mask), algos.masked_var(y, mask))
    torch.testing.assert_close(algos.masked_whiten(x, mask), algos.masked_whiten(y, mask))
    float_mask = mask.double()
    torch.testing.assert_close(algos.masked_mean(x, mask), algos.masked_mean(y, float_mask))


# ---------------------------------------------------------------------------- logits


def test_gather_logprobs_hand_value_and_against_log_softmax():
    logits = t([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = (1/4, 3/4) then (1/2, 1/2)
    ids = torch.tensor([[1, 0]])
    torch.testing.assert_close(algos.gather_logprobs(logits, ids), t([[math.log(0.75), math.log(0.5)]]))
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 11, generator=gen) * 5
    ids = torch.randint(0, 11, (3, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(algos.gather_logprobs(logits, ids), expected)
    half = algos.gather_logprobs(logits.bfloat16(), ids)
    assert half.dtype == torch.float32 and half.shape == (3, 4)
    torch.testing.assert_close(half.double(), expected, atol=0.1, rtol=0.05)


def test_entropy_from_logits_hand_values():
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    # uniform over 4 -> ln 4; (1/4, 3/4) -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    torch.testing.assert_close(algos.entropy_from_logits(logits), t([[math.log(4.0), h2]]))
    mask = t([[1, 0]])
    assert losses.entropy_bonus(logits, mask).item() == pytest.approx(math.log(4.0))


def test_mask_early_stop_renormalises_over_the_other_tokens():
    """min_tokens = 2: for the first two response tokens the stop token (id 0) is out of the distribution, so
    log p(token) = log(p / (1 - p_stop)) by hand; from the third on, and on prompt positions, nothing changes."""
    p_stop, p_a = 0.6, 0.3  # vocabulary: stop, a, b with p = (0.6, 0.3, 0.1)
    logits = torch.log(t([[[p_stop, p_a, 0.1]] * 5]))  # (1, 5, 3): one prompt position, then four response tokens
    response_mask = t([[0, 1, 1, 1, 1]])
    ids = torch.tensor([[2, 1, 1, 1, 0]])
    masked = algos.mask_early_stop(logits.clone(), response_mask, [0], min_tokens=2)
    lp = algos.gather_logprobs(masked, ids)
    torch.testing.assert_close(lp, t([[math.log(0.1), math.log(p_a / (1 - p_stop)), math.log(p_a / (1 - p_stop)),
                                       math.log(p_a), math.log(p_stop)]]))
    h = algos.entropy_from_logits(masked)
    q = (p_a / (1 - p_stop), 0.1 / (1 - p_stop))
    assert h[0, 1].item() == pytest.approx(-sum(x * math.log(x) for x in q))  # finite: no 0 * -inf
    assert h[0, 3].item() == pytest.approx(-sum(x * math.log(x) for x in (p_stop, p_a, 0.1)))
    same = algos.mask_early_stop(logits.clone(), t([[0, 0, 0, 1, 1]]), [0], min_tokens=2)  # later response start
    torch.testing.assert_close(algos.gather_logprobs(same, ids)[0, :3], algos.gather_logprobs(logits, ids)[0, :3])


# ---------------------------------------------------------------------------- rewards on tokens, KL


def test_place_reward_on_last_token():
    mask = t([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    out = algos.place_reward_on_last_token(t([2.0, 3.0, 4.0]), mask)
    assert out.tolist() == [[0, 2, 0], [0, 0, 3], [0, 0, 0]]


def test_token_rewards_with_kl_puts_kl_on_every_token_and_reward_on_the_last():
    """Textbook mistake pinned: KL is a per-token penalty, not one sequence-level number."""
    kl = t([[0.1, 0.2, 9.0], [0.3, 0.1, 0.2]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    out = algos.token_rewards_with_kl(t([1.0, 2.0]), kl, mask, kl_coef=0.5)
    expected = [[-0.05, -0.1 + 1.0, 0.0], [-0.15, -0.05, -0.1 + 2.0]]
    torch.testing.assert_close(out, t(expected))


def test_kl_estimators_hand_values():
    logp, ref = t([math.log(0.5)]), t([math.log(0.25)])  # d = ref - logp = -ln 2
    ln2 = math.log(2.0)
    assert algos.kl_estimate(logp, ref, "k1").item() == pytest.approx(ln2)
    assert algos.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * ln2**2)
    assert algos.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.5 + ln2 - 1.0)  # e^d - d - 1
    with pytest.raises(ValueError, match="k1, k2, k3"):
        algos.kl_estimate(logp, ref, "k4")


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_unbiased_kl_estimators_have_exact_expectation(kind):
    """Second formulation: E_{x~p}[k(x)] summed exactly over a small vocabulary equals KL(p||q)."""
    p, q = t([0.5, 0.3, 0.2]), t([0.2, 0.2, 0.6])
    per_token = algos.kl_estimate(p.log(), q.log(), kind)
    kl = (p * (p / q).log()).sum()
    torch.testing.assert_close((p * per_token).sum(), kl)


# ---------------------------------------------------------------------------- KL controllers


def test_adaptive_kl_controller_hand_update():
    ctl = algos.AdaptiveKLController(init_kl_coef=0.1, target_kl=6.0, horizon=10_000)
    ctl.update(current_kl=9.0, n_steps=256)  # error = clip(0.5) = 0.2 -> *(1 + 0.2*256/1e4)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(current_kl=5.4, n_steps=1000)  # error = -0.1 -> *(1 - 0.01)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99)
    ctl.update(current_kl=0.0, n_steps=1000)  # error clipped at -0.2 -> *(1 - 0.02)
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99 * 0.98)


def test_kl_controller_state_round_trip():
    a = algos.AdaptiveKLController(0.1, 6.0, 10_000)
    a.update(9.0, 500)
    state = a.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    b = algos.AdaptiveKLController(0.7, 6.0, 10_000)
    b.load_state_dict(dict(state))
    assert b.value == a.value
    a.update(3.0, 100)
    b.update(3.0, 100)
    assert b.value == a.value


def test_make_kl_controller():
    fixed = algos.make_kl_controller("fixed", kl_coef=0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    assert isinstance(algos.make_kl_controller("adaptive", init_kl_coef=0.1, target_kl=1, horizon=10),
                      algos.AdaptiveKLController)
    with pytest.raises(ValueError, match="adaptive, fixed"):
        algos.make_kl_controller("pid", kl_coef=0.1)


# ---------------------------------------------------------------------------- advantage estimators: hand values


def call(name, token_rewards, mask, group_ids=None, values=None, gamma=1.0, lam=1.0):
    if group_ids is None:
        group_ids = torch.arange(token_rewards.shape[0])
    fn = algos.get_advantage_estimator(name)
    return fn(token_rewards=token_rewards, mask=mask, group_ids=group_ids, values=values, gamma=gamma, lam=lam)


def test_gae_hand_values_with_right_padding():
    rewards = t([[0.0, 1.0, 100.0]])  # position 2 is padding: its reward and value are ignored
    values = t([[0.5, 0.6, 50.0]])
    mask = t([[1, 1, 0]])
    adv, ret = call("gae", rewards, mask, values=values, gamma=0.9, lam=0.8)
    # t=1: delta = 1 + 0.9*0 - 0.6 = 0.4 (bootstrap 0 after the last token); A1 = 0.4
    # t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04; A0 = 0.04 + 0.9*0.8*0.4 = 0.328
    torch.testing.assert_close(adv, t([[0.328, 0.4, 0.0]]))
    torch.testing.assert_close(ret, t([[0.828, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="values"):
        call("gae", rewards, mask)


# Outcome rewards [1, 0, 0, 5]; groups {7: first three, 3: last (singleton)}.
GROUP_REWARDS = t([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [2.0, 3.0]])
GROUP_MASK = t([[1, 1], [1, 1], [1, 0], [1, 1]])
GROUP_IDS = torch.tensor([7, 7, 7, 3])
SQRT_THIRD = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0)


@pytest.mark.parametrize(
    ("name", "per_seq"),
    [
        ("grpo", [(2 / 3) / SQRT_THIRD, (-1 / 3) / SQRT_THIRD, (-1 / 3) / SQRT_THIRD, 0.0]),
        ("drgrpo", [2 / 3, -1 / 3, -1 / 3, 0.0]),
        ("rloo", [1 - 0.0, 0 - 0.5, 0 - 0.5, 0.0]),  # r_i - mean of the other two
    ],
)
def test_group_estimators_hand_values(name, per_seq):
    adv, ret = call(name, GROUP_REWARDS, GROUP_MASK, GROUP_IDS)
    expected = torch.where(GROUP_MASK.bool(), t(per_seq).unsqueeze(-1), 0.0)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, torch.where(GROUP_MASK.bool(), t([1.0, 0, 0, 5]).unsqueeze(-1), 0.0))


def test_reinforce_hand_values():
    rewards = t([[0.0, 1.0], [2.0, GARBAGE]])
    mask = t([[1, 1], [1, 0]])
    adv, ret = call("reinforce", rewards, mask, gamma=0.5)
    # returns-to-go: row0 [0 + 0.5*1, 1] = [0.5, 1]; row1 [2]
    torch.testing.assert_close(ret, t([[0.5, 1.0], [2.0, 0.0]]))
    # baseline per position: pos0 mean(0.5, 2) = 1.25, pos1 mean(1) = 1 -> raw [-0.75, 0, 0.75]
    # whitened over the batch's 3 tokens: mean 0, unbiased std 0.75 -> [-1, 0, 1]
    torch.testing.assert_close(adv, t([[-1.0, 0.0], [1.0, 0.0]]), atol=1e-6, rtol=0)
    values = t([[0.5, 0.0], [1.0, GARBAGE]])  # baseline from a critic: raw [0, 1, 1]
    adv, _ = call("reinforce", rewards, mask, values=values, gamma=0.5)
    s = math.sqrt(1 / 3)  # unbiased std of (0, 1, 1), mean 2/3
    torch.testing.assert_close(adv, t([[-2 / 3 / s, 1 / 3 / s], [1 / 3 / s, 0.0]]), atol=1e-6, rtol=0)


def test_reinforce_normalises_across_the_batch_so_single_step_episodes_keep_their_signal():
    """Textbook mistake pinned: normalising inside one trajectory of length 1 gives 0 advantage."""
    rewards = t([[1.0], [0.0], [0.0], [1.0]])
    adv, _ = call("reinforce", rewards, torch.ones(4, 1))
    # raw = r - 0.5 = +-0.5; unbiased batch std = sqrt(1/3) -> +-0.5/sqrt(1/3) = +-0.866
    torch.testing.assert_close(adv, t([[0.866025], [-0.866025], [-0.866025], [0.866025]]), atol=1e-5, rtol=0)
    per_trajectory = [algos.masked_whiten(rewards[i : i + 1], torch.ones(1, 1)) for i in range(4)]
    assert all(a.abs().item() == 0.0 for a in per_trajectory)  # the mistake would erase the signal


def test_uniform_group_mask_hand_values():
    rewards = t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0])
    groups = torch.tensor([0, 0, 1, 1, 5, 5, 9])
    assert algos.uniform_group_mask(rewards, groups).tolist() == [True, True, False, False, True, True, True]
    assert algos.uniform_group_mask(t([1.0, 1.05]), torch.tensor([0, 0]), atol=0.1).tolist() == [True, True]


def test_get_advantage_estimator_unknown_name_lists_valid_ones():
    assert sorted(algos.ADVANTAGE_ESTIMATORS) == sorted(ESTIMATORS + ["reinforce_pp", "reinforce_pp_baseline", "rwr"])
    with pytest.raises(ValueError, match="drgrpo, gae, grpo, reinforce, reinforce_pp, reinforce_pp_baseline, rloo"):
        algos.get_advantage_estimator("ppo")


def test_register_advantage_refuses_duplicates():
    with pytest.raises(ValueError, match="twice"):
        algos.register_advantage("gae")(lambda **kw: None)


# ---------------------------------------------------------------------------- second formulation: plain loops


def loop_gae(rewards, values, mask, gamma, lam):
    adv = [[0.0] * len(row) for row in rewards]
    for i, row in enumerate(mask):
        idx = [j for j, m in enumerate(row) if m]
        next_v, next_a = 0.0, 0.0
        for j in reversed(idx):
            delta = rewards[i][j] + gamma * next_v - values[i][j]
            next_a = delta + gamma * lam * next_a
            next_v = values[i][j]
            adv[i][j] = next_a
    return adv


def loop_returns(rewards, mask, gamma):
    out = [[0.0] * len(row) for row in rewards]
    for i, row in enumerate(mask):
        g = 0.0
        for j in reversed([j for j, m in enumerate(row) if m]):
            g = rewards[i][j] + gamma * g
            out[i][j] = g
    return out


def loop_group(rewards, mask, groups, name):
    seq = [sum(r for r, m in zip(rr, mm, strict=True) if m) for rr, mm in zip(rewards, mask, strict=True)]
    out = []
    for i, r in enumerate(seq):
        members = [seq[j] for j in range(len(seq)) if groups[j] == groups[i]]
        others = [seq[j] for j in range(len(seq)) if groups[j] == groups[i] and j != i]
        if not others:
            out.append(0.0)
        elif name == "grpo":
            out.append((r - statistics.mean(members)) / (statistics.stdev(members) + 1e-6))
        elif name == "drgrpo":
            out.append(r - statistics.mean(members))
        else:  # rloo
            out.append(r - statistics.mean(others))
    return [[a if m else 0.0 for m in row] for a, row in zip(out, mask, strict=True)]


def loop_reinforce(rewards, values, mask, gamma):
    g = loop_returns(rewards, mask, gamma)
    batch, length = len(mask), len(mask[0])
    raw = {}
    for j in range(length):
        present = [i for i in range(batch) if mask[i][j]]
        for i in present:
            base = values[i][j] if values is not None else statistics.mean(g[k][j] for k in present)
            raw[(i, j)] = g[i][j] - base
    mean, std = statistics.mean(raw.values()), (statistics.stdev(raw.values()) if len(raw) > 1 else 0.0)
    out = [[0.0] * length for _ in range(batch)]
    for (i, j), a in raw.items():
        out[i][j] = (a - mean) / math.sqrt(std**2 + 1e-8)
    return out


SHAPES = [(1, 1), (1, 5), (4, 1), (4, 6), (8, 3), (6, 16)]


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("gaps", [False, True])
def test_estimators_match_loop_formulation(name, shape, seed, gaps):
    batch, length = shape
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(batch, length, gen, gaps=gaps)
    rewards = torch.randn(batch, length, generator=gen)
    values = torch.randn(batch, length, generator=gen)
    groups = torch.randint(0, max(1, batch // 2), (batch,), generator=gen) * 10
    gamma, lam = 0.95, 0.9
    use_values = values if name == "gae" or (name == "reinforce" and seed == 1) else None
    adv, _ = call(name, with_garbage(rewards, mask), mask, groups, use_values, gamma, lam)
    r, v, m, g = rewards.tolist(), values.tolist(), mask.tolist(), groups.tolist()
    if name == "gae":
        expected = loop_gae(r, v, m, gamma, lam)
    elif name == "reinforce":
        expected = loop_reinforce(r, v if use_values is not None else None, m, gamma)
    else:
        expected = loop_group(r, m, g, name)
    torch.testing.assert_close(adv, t(expected), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_discounted_returns_match_loop(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(5, 7, gen, gaps=seed == 2)
    rewards = torch.randn(5, 7, generator=gen)
    out = algos.discounted_returns(with_garbage(rewards, mask), mask, 0.9)
    torch.testing.assert_close(out, t(loop_returns(rewards.tolist(), mask.tolist(), 0.9)))


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimators_share_one_signature_and_ignore_padding(name):
    gen = torch.Generator().manual_seed(3)
    mask = random_mask(6, 5, gen)
    rewards, values = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, ret = call(name, rewards, mask, groups, values, 0.9, 0.95)
    adv2, ret2 = call(name, with_garbage(rewards, mask), mask.double(), groups, with_garbage(values, mask), 0.9, 0.95)
    assert adv.shape == ret.shape == (6, 5)
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)


# ---------------------------------------------------------------------------- group-estimator properties

group_batches = st.integers(2, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-10, 10, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.integers(0, 2), min_size=n, max_size=n),
        st.lists(st.floats(-50, 50, allow_nan=False), min_size=3, max_size=3),
    )
)


def outcome_advantages(name, rewards, groups):
    token_rewards = t(rewards).unsqueeze(-1)
    adv, _ = call(name, token_rewards, torch.ones_like(token_rewards), torch.tensor(groups))
    return adv


def well_separated(rewards, groups):
    """GRPO's eps makes near-uniform groups ill-conditioned; compare only groups with real spread."""
    by_group = {}
    for r, g in zip(rewards, groups, strict=True):
        by_group.setdefault(g, []).append(r)
    return all(len(v) == 1 or max(v) - min(v) > 0.1 or max(v) == min(v) for v in by_group.values())


@settings(max_examples=80, deadline=None)
@given(group_batches)
@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo"])
def test_group_advantages_invariant_to_per_group_shift(name, batch):
    rewards, groups, shifts = batch
    assume(well_separated(rewards, groups))
    shifted = [r + shifts[g] for r, g in zip(rewards, groups, strict=True)]
    torch.testing.assert_close(
        outcome_advantages(name, rewards, groups), outcome_advantages(name, shifted, groups), atol=1e-4, rtol=1e-4
    )


@settings(max_examples=80, deadline=None)
@given(group_batches, st.floats(0.1, 100.0))
def test_grpo_invariant_to_positive_scaling(batch, scale):
    rewards, groups, _ = batch
    assume(well_separated(rewards, groups))
    scaled = [r * scale for r in rewards]
    torch.testing.assert_close(
        outcome_advantages("grpo", rewards, groups), outcome_advantages("grpo", scaled, groups), atol=1e-4, rtol=1e-4
    )


@settings(max_examples=50, deadline=None)
@given(group_batches)
def test_uniform_groups_get_zero_advantage_everywhere(batch):
    rewards, groups, _ = batch
    uniform = algos.uniform_group_mask(t(rewards), torch.tensor(groups))
    for name in ["grpo", "drgrpo", "rloo"]:
        adv = outcome_advantages(name, rewards, groups).squeeze(-1)
        assert (adv[uniform].abs() < 1e-9).all()


def test_reward_baseline_by_hand_and_against_rloo():
    r = torch.tensor([1.0, 0.0, 0.0, 3.0, 5.0, 2.0])
    g = torch.tensor([7, 7, 7, 9, 9, 4])  # groups of 3, 2 and a singleton
    group = algos.baseline_rewards(r, g, "group")
    # 1 - (0+0)/2, 0 - (1+0)/2, 0 - (1+0)/2; 3 - 5, 5 - 3; the singleton keeps its reward
    assert group.tolist() == pytest.approx([1.0, -0.5, -0.5, -2.0, 2.0, 2.0])
    # a second formulation: RLOO's advantage is the same leave-one-out difference
    mask = torch.ones(6, 1)
    rloo, _ = algos.rloo_advantages(token_rewards=r[:, None], mask=mask, group_ids=g)
    assert group[:5].tolist() == pytest.approx(rloo[:5, 0].tolist())
    batch = algos.baseline_rewards(r, g, "batch")
    assert batch.tolist() == pytest.approx(((r - r.mean()) / r.std()).tolist(), abs=1e-6)
    assert algos.baseline_rewards(r, g, "none") is r
    with pytest.raises(ValueError, match="unknown reward baseline 'x'"):
        algos.baseline_rewards(r, g, "x")
