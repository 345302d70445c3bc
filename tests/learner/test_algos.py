"""Tests for learner/algos.py: hand-computed values, a second (loop) formulation of every
estimator, gradient checks, properties, and the four textbook mistakes pinned."""

import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from learner import algos

pytestmark = pytest.mark.usefixtures("float64")  # the whole module (tests/learner/conftest.py)


GARBAGE = 1e4  # what padded positions hold in the "padding is ignored" tests (large, NaN-free)
ESTIMATORS = ["gae", "grpo", "drgrpo", "rloo", "reinforce"]


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def random_mask(batch: int, length: int, gen: torch.Generator, gaps: bool = False) -> torch.Tensor:
    """Right-padded response mask, every row at least one token; optional interior gaps."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    if gaps:
        holes = torch.rand(batch, length, generator=gen) < 0.2
        holes[:, 0] = False
        mask = mask & ~holes
    return mask


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, GARBAGE)


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
    assert algos.entropy_bonus(logits, mask).item() == pytest.approx(math.log(4.0))


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


def test_kl_loss_is_aggregated_estimate():
    logp, ref = t([[-1.0, -2.0, 5.0]]), t([[-1.5, -1.0, 7.0]])
    mask = t([[1, 1, 0]])
    d = [-0.5, 1.0]
    expected = sum(math.exp(v) - v - 1 for v in d) / 2
    assert algos.kl_loss(logp, ref, mask, "k3").item() == pytest.approx(expected)
    assert algos.kl_loss(logp, ref, mask, "k1", "seq-mean-token-sum").item() == pytest.approx(0.5 - 1.0)


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


# ---------------------------------------------------------------------------- aggregation

LOSS = [[1.0, 2.0, 3.0], [4.0, GARBAGE, GARBAGE]]
LOSS_MASK = [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    ("mode", "constant", "expected"),
    [
        ("token-mean", None, 10 / 4),
        ("seq-mean-token-sum", None, (6 + 4) / 2),
        ("seq-mean-token-mean", None, (2 + 4) / 2),
        ("seq-mean-token-sum-norm", None, (6 / 3 + 4 / 3) / 2),  # default constant = T = 3
        ("seq-mean-token-sum-norm", 5.0, (6 / 5 + 4 / 5) / 2),
    ],
)
def test_aggregate_loss_hand_values(mode, constant, expected):
    assert algos.aggregate_loss(t(LOSS), t(LOSS_MASK), mode, constant).item() == pytest.approx(expected)


def test_aggregate_loss_mode_changes_the_gradient():
    grads = {}
    for mode in algos.AGG_MODES:
        loss_mat = t(LOSS).requires_grad_()
        algos.aggregate_loss(loss_mat, t(LOSS_MASK), mode).backward()
        grads[mode] = loss_mat.grad
    torch.testing.assert_close(grads["token-mean"], t([[0.25] * 3, [0.25, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-sum"], t([[0.5] * 3, [0.5, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-mean"], t([[1 / 6] * 3, [0.5, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-sum-norm"], t([[1 / 6] * 3, [1 / 6, 0, 0]]))


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm, token-mean"):
        algos.aggregate_loss(t(LOSS), t(LOSS_MASK), "sum")


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


# ---------------------------------------------------------------------------- policy loss


def one_token(logprob_minus_old, advantage, **kw):
    lp = t([[logprob_minus_old]])
    return algos.policy_loss(lp, t([[0.0]]), t([[advantage]]), t([[1]]), **kw)


@pytest.mark.parametrize(
    ("ratio", "adv", "kw", "expected", "clipped"),
    [
        (1.5, 1.0, {}, -1.2, 1.0),  # -min(1.5, 1.2)
        (1.1, 1.0, {}, -1.1, 0.0),
        (0.5, -1.0, {}, 0.8, 1.0),  # max(0.5, 0.8)
        (0.5, 1.0, {}, -0.5, 0.0),  # low ratio with A > 0 is not clipped (pessimistic bound)
        (1.25, 1.0, {"clip_high": 0.28}, -1.25, 0.0),  # clip-higher lets it through
        (0.75, -1.0, {"clip_low": 0.1}, 0.9, 1.0),
        (3.0, -1.0, {}, 3.0, 0.0),
        (3.0, -1.0, {"dual_clip": 2.0}, 2.0, 0.0),  # dual clip caps at 2 * |A|
        (1.5, -2.0, {"dual_clip": 2.0}, 3.0, 0.0),  # below the cap: unchanged
    ],
)
def test_policy_loss_hand_values(ratio, adv, kw, expected, clipped):
    loss, stats = one_token(math.log(ratio), adv, **kw)
    assert loss.item() == pytest.approx(expected)
    assert stats.clip_fraction.item() == clipped
    assert stats.approx_kl.item() == pytest.approx(ratio - 1 - math.log(ratio))  # k3 of KL(old || new)
    assert stats.tis_weight_mean.item() == 1.0


def test_policy_loss_ratio_is_per_sampled_token_not_full_vocabulary():
    """Textbook mistake pinned: old p = (1/3, 1/3, 1/3), new p = (1/2, 1/4, 1/4). The sampled token 0
    has ratio 1.5 (clipped to 1.2 for A > 0); the mean full-vocabulary ratio would be exactly 1."""
    old_logits = t([[[0.0, 0.0, 0.0]]])
    new_logits = t([[[math.log(2.0), 0.0, 0.0]]]).requires_grad_()
    ids = torch.tensor([[0]])
    lp, old = algos.gather_logprobs(new_logits, ids), algos.gather_logprobs(old_logits, ids)
    loss, stats = algos.policy_loss(lp, old, t([[1.0]]), t([[1]]))
    assert loss.item() == pytest.approx(-1.2)
    assert stats.clip_fraction.item() == 1.0
    full_vocab_ratio = (new_logits.softmax(-1) / old_logits.softmax(-1)).mean()
    assert full_vocab_ratio.item() == pytest.approx(1.0)
    # two tokens, A = +1, ratios 1.5 and 0.5 -> mean(-1.2, -0.5), not -mean ratio = -1
    loss, _ = algos.policy_loss(t([[math.log(1.5), math.log(0.5)]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]))
    assert loss.item() == pytest.approx(-0.85)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_gradient_at_ratio_one_is_vanilla_policy_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(4, 6, gen)
    old = -torch.rand(4, 6, generator=gen) * 3
    adv = torch.randn(4, 6, generator=gen)
    lp = old.clone().requires_grad_()
    loss, stats = algos.policy_loss(lp, old, adv, mask, dual_clip=3.0)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(lp.grad, -adv * mask / n)
    assert stats.clip_fraction.item() == 0.0 and stats.approx_kl.item() == 0.0


def test_clipped_tokens_contribute_zero_gradient():
    ratios = t([[1.5, 1.1, 0.5, 0.5, 3.0]])
    adv = t([[1.0, 1.0, -1.0, 1.0, -1.0]])
    lp = ratios.log().requires_grad_()
    loss, _ = algos.policy_loss(lp, torch.zeros(1, 5), adv, torch.ones(1, 5), dual_clip=2.0)
    loss.backward()
    # token 0 clipped (A>0, r>1.2), token 2 clipped (A<0, r<0.8), token 4 dual-clipped: zero gradient.
    # others: d(-A r)/d logp = -A r, divided by 5 tokens
    torch.testing.assert_close(lp.grad, t([[0.0, -1.1 / 5, 0.0, -0.5 / 5, 0.0]]))


def test_truncated_importance_sampling_hand_values():
    lp = t([[0.0, 0.0]]).requires_grad_()
    old = t([[0.0, 0.0]])
    behaviour = t([[-math.log(3.0), math.log(2.0)]])  # weights exp(old - behaviour) = 3 -> capped 2, and 0.5
    loss, stats = algos.policy_loss(lp, old, t([[1.0, 1.0]]), t([[1, 1]]), behaviour_logprobs=behaviour, tis_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert stats.tis_weight_mean.item() == pytest.approx(1.25)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-1.0, -0.25]]))  # -A * w / N, weight detached
    uncapped, stats = algos.policy_loss(lp, old, t([[1.0, 1.0]]), t([[1, 1]]), behaviour_logprobs=behaviour)
    assert uncapped.item() == pytest.approx(-(3.0 + 0.5) / 2)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(0.0, 1.0, dual_clip=0.9)


@pytest.mark.parametrize("agg_mode", list(algos.AGG_MODES))
def test_policy_loss_padding_contributes_nothing(agg_mode):
    gen = torch.Generator().manual_seed(5)
    mask = random_mask(4, 6, gen)
    old = -torch.rand(4, 6, generator=gen) * 2
    lp0 = old + 0.3 * torch.randn(4, 6, generator=gen)
    adv = torch.randn(4, 6, generator=gen)
    behaviour = old + 0.2 * torch.randn(4, 6, generator=gen)
    kw = {"agg_mode": agg_mode, "dual_clip": 3.0, "tis_cap": 2.0, "clip_high": 0.28}

    def run(garbage):
        fill = (lambda x: with_garbage(x, mask)) if garbage else (lambda x: x)
        lp = fill(lp0).detach().clone().requires_grad_()
        loss, stats = algos.policy_loss(lp, fill(old), fill(adv), mask, behaviour_logprobs=fill(behaviour), **kw)
        loss.backward()
        return loss, lp.grad, stats

    (loss_a, grad_a, stats_a), (loss_b, grad_b, stats_b) = run(False), run(True)
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b)
    assert (grad_b[~mask] == 0).all()
    for field in ("clip_fraction", "approx_kl", "dual_clip_fraction", "tis_weight_mean"):
        torch.testing.assert_close(getattr(stats_a, field), getattr(stats_b, field))


def test_value_and_kl_losses_ignore_padding():
    gen = torch.Generator().manual_seed(7)
    mask = random_mask(5, 4, gen)
    v0, old, ret, ref = (torch.randn(5, 4, generator=gen) for _ in range(4))

    def run(garbage):
        fill = (lambda x: with_garbage(x, mask)) if garbage else (lambda x: x)
        v = fill(v0).detach().clone().requires_grad_()
        vl, frac = algos.value_loss(v, fill(old), fill(ret), mask, clip=0.2, agg_mode="seq-mean-token-mean")
        kl = algos.kl_loss(v, fill(ref).clamp(max=50), mask, "k2")  # v as logprobs; k2 stays finite
        (vl + kl).backward()
        return vl, frac, kl, v.grad

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b)


def test_metrics_helpers_hand_values():
    lp, old = t([[math.log(1.5), math.log(0.5), 9.0]]), t([[0.0, 0.0, 0.0]])
    adv, mask = t([[1.0, 1.0, 1.0]]), t([[1, 1, 0]])
    assert algos.clip_fraction(lp, old, adv, mask).item() == 0.5
    expected_kl = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 2
    assert algos.approx_kl(lp, old, mask).item() == pytest.approx(expected_kl)
    ret, mask = t([[1.0, 2.0, 3.0, GARBAGE]]), t([[1, 1, 1, 0]])
    # R - V = (0, 0, 1): unbiased var 1/3; Var[R] = 1 -> 2/3
    assert algos.explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), ret, mask).item() == pytest.approx(2 / 3)
    assert algos.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- value loss


def test_value_loss_hand_values():
    v, old, ret, mask = t([[1.5, 7.0]]), t([[1.0, 3.0]]), t([[2.0, -5.0]]), t([[1, 0]])
    loss, frac = algos.value_loss(v, old, ret, mask)
    assert loss.item() == pytest.approx(0.5 * 0.25) and frac.item() == 0.0
    # clipped value 1.2 -> (1.2 - 2)^2 = 0.64 > 0.25 -> 0.5 * 0.64
    loss, frac = algos.value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0
    # moving away from the return is not clipped: v = 2.5 -> (0.5)^2 vs clipped 1.2 -> 0.64
    v_grad = t([[2.5, 7.0]]).requires_grad_()
    loss, frac = algos.value_loss(v_grad, old, ret, mask, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0
    assert v_grad.grad.tolist() == [[0.0, 0.0]]  # the clipped branch is active: no gradient


# ---------------------------------------------------------------------------- offline objectives


def test_bradley_terry_and_accuracy_hand_values():
    chosen, rejected = t([1.0, 0.0]), t([0.0, 0.0])
    softplus = lambda x: math.log1p(math.exp(x))  # -logsigmoid(x) = softplus(-x)  # noqa: E731
    assert algos.bradley_terry_loss(chosen, rejected).item() == pytest.approx((softplus(-1) + softplus(0)) / 2)
    assert algos.bradley_terry_loss(chosen, rejected, margin=1.0).item() == pytest.approx(
        (softplus(0) + softplus(1)) / 2
    )
    assert algos.bradley_terry_loss(chosen, rejected, margin=t([1.0, 0.0])).item() == pytest.approx(softplus(0))
    assert algos.pairwise_accuracy(chosen, rejected).item() == 0.5


def test_sequence_logprobs_sum_and_mean():
    lp, mask = t([[-1.0, -2.0, -3.0], [-1.0, GARBAGE, GARBAGE]]), t([[1, 1, 1], [1, 0, 0]])
    assert algos.sequence_logprobs(lp, mask).tolist() == [-6.0, -1.0]
    assert algos.sequence_logprobs(lp, mask, length_normalize=True).tolist() == [-2.0, -1.0]


def test_dpo_uses_the_sequence_sum_not_the_length_normalised_mean():
    """Textbook mistake pinned: DPO's log pi(y|x) is the SUM of token log-probs. With a 3-token chosen
    and a 1-token rejected answer the two formulations give different losses."""
    pol_c, ref_c = t([[-1.0, -1.0, -1.0]]), t([[-2.0, -2.0, -2.0]])  # +1 per token
    pol_r, ref_r = t([[-1.0, 0.0, 0.0]]), t([[-1.5, 0.0, 0.0]])  # +0.5, one token
    mask_c, mask_r = t([[1, 1, 1]]), t([[1, 0, 0]])

    def loss(norm):
        s = lambda x, m: algos.sequence_logprobs(x, m, length_normalize=norm)  # noqa: E731
        return algos.dpo_loss(s(pol_c, mask_c), s(pol_r, mask_r), s(ref_c, mask_c), s(ref_r, mask_r), beta=1.0)[0]

    assert loss(False).item() == pytest.approx(math.log1p(math.exp(-(3.0 - 0.5))))  # h = 2.5
    assert loss(True).item() == pytest.approx(math.log1p(math.exp(-(1.0 - 0.5))))  # h = 0.5
    assert loss(False).item() != pytest.approx(loss(True).item())


def test_dpo_hand_values_and_gradient():
    pc, pr = t([-1.0]).requires_grad_(), t([-2.0])
    rc, rr = t([-1.5]), t([-1.5])  # h = 0.5 - (-0.5) = 1
    loss, chosen, rejected = algos.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))  # -beta * sigmoid(-beta h)
    smooth, _, _ = algos.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    # 0.9 * softplus(-0.1) + 0.1 * softplus(0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)))
    ipo, _, _ = algos.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.0 - 5.0) ** 2)
    with pytest.raises(ValueError, match="ipo, sigmoid"):
        algos.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_rwr_weights_hand_values():
    a = 1 / math.sqrt(2)  # rewards (0, 1) whitened with unbiased std sqrt(1/2): z = -+a
    w = algos.rwr_weights(t([0.0, 1.0]))
    denom = math.exp(-a) + math.exp(a)
    torch.testing.assert_close(w, t([2 * math.exp(-a) / denom, 2 * math.exp(a) / denom]))
    torch.testing.assert_close(algos.rwr_weights(t([0.0, 1.0]), top_fraction=0.5), t([0.0, 2.0]))
    torch.testing.assert_close(algos.rwr_weights(t([3.0, 3.0, 3.0])), t([1.0, 1.0, 1.0]))
    sharp = algos.rwr_weights(t([0.0, 1.0, 2.0, 3.0]), beta=0.01)  # overflow-safe, mass on the best
    assert torch.isfinite(sharp).all() and sharp.mean().item() == pytest.approx(1.0)
    assert sharp[-1].item() == pytest.approx(4.0)


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
