"""Tests for the objectives of issue 14: the policy-loss registry (ppo, gspo, gspo_token, cispo) and rollout
correction (none, tis, seq_tis, masked_is) in learner/losses.py, and REINFORCE++ (with and without baseline) in
learner/algos.py. Each is checked against hand-computed values and against a second formulation
written here as plain loops over sequences and tokens (values and autograd gradients, float64)."""

import math
import statistics
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner import algos, losses
from learner.config import AlgorithmConfig
from tests.learner.tensors import GARBAGE, random_mask, t, with_garbage

pytestmark = pytest.mark.usefixtures("float64")  # the whole module (tests/learner/conftest.py)


LOSSES = ["ppo", "gspo", "gspo_token", "cispo"]
AGG_MODES = list(losses.AGG_MODES)
LN2, LN3 = math.log(2.0), math.log(3.0)


def close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


def random_batch(seed: int, batch: int = 4, length: int = 6, spread: float = 0.3):
    """mask, old logprobs, new logprobs (a leaf), per-sequence advantages, behaviour logprobs."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(batch, length, gen)
    old = -torch.rand(batch, length, generator=gen) * 3
    new = old + spread * torch.randn(batch, length, generator=gen)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length).clone()
    behaviour = old + 0.3 * torch.randn(batch, length, generator=gen)
    return mask, old, new, adv, behaviour


def run_loss(name, lp0, old, adv, mask, **kw):
    """Loss, d loss / d logprobs and stats of the registered loss `name`."""
    lp = lp0.detach().clone().requires_grad_()
    loss, stats = losses.get_policy_loss(name)(lp, old, adv, mask, **kw)
    loss.backward()
    return loss, lp.grad, stats


# ---------------------------------------------------------------------------- registry and config


def test_policy_loss_registry_names_and_lookup():
    assert sorted(losses.POLICY_LOSSES) == ["cispo", "gspo", "gspo_token", "nll", "ppo"]
    assert losses.get_policy_loss("ppo") is losses.policy_loss  # existing callers keep the same function
    with pytest.raises(ValueError, match="cispo, gspo, gspo_token, nll, ppo"):
        losses.get_policy_loss("grpo")
    with pytest.raises(ValueError, match="twice"):
        losses.register_policy_loss("ppo")(lambda *a, **kw: None)


def test_every_config_name_has_an_implementation():
    fields = AlgorithmConfig.model_fields
    for name in typing.get_args(fields["name"].annotation):
        algos.get_advantage_estimator("gae" if name == "ppo" else name)  # ppo = critic + GAE
    literal, none = typing.get_args(fields["policy_loss"].annotation)  # null: chosen by algorithm.name
    assert none is type(None) and set(typing.get_args(literal)) == set(losses.POLICY_LOSSES)
    assert set(typing.get_args(fields["rollout_correction"].annotation)) == set(losses.ROLLOUT_CORRECTIONS)


def test_config_defaults_keep_todays_behaviour():
    cfg = AlgorithmConfig()
    assert (cfg.policy_loss, cfg.rollout_correction, cfg.tis_cap) == ("ppo", "tis", 2.0)
    assert (cfg.dynamic_sampling, cfg.mask_truncated) == (False, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policy_loss": "gspo", "dual_clip": 3.0}, "algorithm.dual_clip"),
        ({"policy_loss": "cispo", "dual_clip": 3.0}, "policy_loss ppo only"),
        ({"tis_cap": None}, "algorithm.tis_cap"),
        ({"rollout_correction": "seq_tis", "tis_cap": None}, "rollout_correction: none"),
        ({"is_low": 1.0}, "is_low"),
        ({"is_high": 0.9}, "is_high"),
        ({"dynamic_sampling": True, "drop_uniform_groups": False}, "algorithm.drop_uniform_groups"),
        ({"max_extra_prompts_per_step": -1}, "max_extra_prompts_per_step"),
    ],
)
def test_config_rejects_contradictions(overrides, message):
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**overrides)


def test_config_accepts_the_consistent_neighbours():
    AlgorithmConfig(rollout_correction="none", tis_cap=None)
    AlgorithmConfig(rollout_correction="masked_is", tis_cap=None, is_low=0.2, is_high=5.0)
    AlgorithmConfig(policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, loss_agg="seq-mean-token-mean")
    AlgorithmConfig(name="reinforce_pp_baseline", policy_loss="cispo", dynamic_sampling=True)


# ---------------------------------------------------------------------------- GSPO: hand values and properties

# Two sequences: the first has log-ratios (0.2, 0.0) and A = +1; the second one token, log-ratio -0.3, A = -1.
GSPO_LP = [[0.2, 0.0], [-0.3, 7.0]]  # old log-probs are 0, so these are the log-ratios; 7.0 is padding
GSPO_ADV = [[1.0, 1.0], [-1.0, -1.0]]
GSPO_MASK = [[1, 1], [1, 0]]
S0, S1 = math.exp(0.1), math.exp(-0.3)  # s_0 = exp(mean(0.2, 0)) = 1.10517; s_1 = 0.74082 < 0.8


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_hand_values(name):
    kw = {"clip_low": 0.2, "clip_high": 0.2}
    # sequence 0: s_0 inside [0.8, 1.2] -> l_0 = -s_0 * 1; sequence 1: A < 0 and s_1 < 0.8 -> clipped, l_1 = 0.8
    loss, grad, stats = run_loss(name, t(GSPO_LP), torch.zeros(2, 2), t(GSPO_ADV), t(GSPO_MASK),
                                 agg_mode="seq-mean-token-mean", **kw)
    assert loss.item() == pytest.approx((-S0 + 0.8) / 2)
    # d l_0 / d logp_t = -A s_0 / |y_0| = -s_0 / 2 per token, then / 2 sequences; the clipped sequence: 0
    close(grad, t([[-S0 / 4, -S0 / 4], [0.0, 0.0]]))
    token_mean, grad, _ = run_loss(name, t(GSPO_LP), torch.zeros(2, 2), t(GSPO_ADV), t(GSPO_MASK),
                                   agg_mode="token-mean", **kw)
    # token-mean: each sequence's term counted once per token: (2 * -s_0 + 1 * 0.8) / 3 tokens
    assert token_mean.item() == pytest.approx((-2 * S0 + 0.8) / 3)
    close(grad, t([[-S0 / 3, -S0 / 3], [0.0, 0.0]]))


def test_gspo_clip_fraction_counts_sequences_and_gspo_token_counts_tokens():
    kw = {"clip_low": 0.2, "clip_high": 0.2, "agg_mode": "seq-mean-token-mean"}
    _, _, seq_stats = run_loss("gspo", t(GSPO_LP), torch.zeros(2, 2), t(GSPO_ADV), t(GSPO_MASK), **kw)
    _, _, tok_stats = run_loss("gspo_token", t(GSPO_LP), torch.zeros(2, 2), t(GSPO_ADV), t(GSPO_MASK), **kw)
    assert seq_stats.clip_fraction.item() == 0.5  # sequence 1 of {0, 1}
    assert tok_stats.clip_fraction.item() == pytest.approx(1 / 3)  # its one token of three


def test_gspo_ratio_is_one_number_per_sequence():
    """PPO clips the one token whose ratio is e; GSPO sees the sequence's geometric mean e^(0.05) and keeps
    every token; when the mean leaves the band, every token of the sequence loses its gradient together."""
    old = torch.zeros(1, 3)
    adv = torch.ones(1, 3)
    mask = torch.ones(1, 3)
    lp = t([[1.0, -0.9, 0.05]])  # mean log-ratio 0.05
    _, ppo_grad, _ = run_loss("ppo", lp, old, adv, mask)
    assert ppo_grad[0, 0].item() == 0.0 and (ppo_grad[0, 1:] != 0).all()
    _, gspo_grad, stats = run_loss("gspo", lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    s = math.exp(0.05)
    close(gspo_grad, t([[-s / 3] * 3]))  # one ratio, one gradient for all tokens
    assert stats.clip_fraction.item() == 0.0
    lp = t([[1.0, 0.0, 0.0]])  # mean 1/3: s = 1.396 > 1.2 -> the whole sequence is clipped, even ratio-1 tokens
    _, gspo_grad, stats = run_loss("gspo", lp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert (gspo_grad == 0).all() and stats.clip_fraction.item() == 1.0
    # a permutation of the tokens inside a sequence leaves its ratio, hence the loss, unchanged
    a, _, _ = run_loss("gspo", t([[0.3, -0.1, 0.2]]), old, adv, mask, clip_low=0.2, clip_high=0.2)
    b, _, _ = run_loss("gspo", t([[0.2, 0.3, -0.1]]), old, adv, mask, clip_low=0.2, clip_high=0.2)
    close(a, b)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("correction", ["none", "seq_tis"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gspo_token_equals_gspo_with_sequence_advantages(agg_mode, correction, seed):
    """GSPO paper, sec. 4.3: with A_{i,t} = A_i the two are identical in value, clipping and gradient
    (also under a correction weight that is one number per sequence)."""
    mask, old, new, adv, behaviour = random_batch(seed, batch=6)
    weights, kept, _ = losses.rollout_correction(old, behaviour, mask, correction, cap=1.5)
    kw = {"clip_low": 0.05, "clip_high": 0.08, "agg_mode": agg_mode, "is_weights": weights}
    loss_s, grad_s, stats_s = run_loss("gspo", new, old, adv, kept, **kw)
    loss_t, grad_t, _ = run_loss("gspo_token", new, old, adv, kept, **kw)
    close(loss_t, loss_s)
    close(grad_t, grad_s)
    assert 0 < stats_s.clip_fraction < 1  # some sequences clipped, some not: both branches compared


def test_gspo_and_gspo_token_weigh_token_level_corrections_differently():
    """A per-token weight w_t: gspo scales its sequence term by the weights' mean (seq-mean-token-mean),
    so every token gets -A s mean(w) / |y|; gspo_token scales each token's own gradient, -A s w_t / |y|."""
    old, adv, mask = torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2)
    lp, w = t([[0.02, 0.0]]), t([[2.0, 0.5]])
    s = math.exp(0.01)
    _, grad, _ = run_loss("gspo", lp, old, adv, mask, clip_low=0.2, clip_high=0.2, is_weights=w)
    close(grad, t([[-s * 1.25 / 2, -s * 1.25 / 2]]))
    _, grad, _ = run_loss("gspo_token", lp, old, adv, mask, clip_low=0.2, clip_high=0.2, is_weights=w)
    close(grad, t([[-s * 2.0 / 2, -s * 0.5 / 2]]))


def test_gspo_uses_the_mean_of_unequal_token_advantages_and_gspo_token_keeps_them():
    old, mask = torch.zeros(1, 2), torch.ones(1, 2)
    lp = t([[0.02, 0.0]])  # s = exp(0.01), inside the band
    _, grad, _ = run_loss("gspo", lp, old, t([[1.0, 3.0]]), mask, clip_low=0.2, clip_high=0.2)
    s = math.exp(0.01)
    close(grad, t([[-2.0 * s / 2, -2.0 * s / 2]]))  # A = mean(1, 3) = 2; d/dlogp_t = -A s / |y|
    _, grad, _ = run_loss("gspo_token", lp, old, t([[1.0, 3.0]]), mask, clip_low=0.2, clip_high=0.2)
    close(grad, t([[-1.0 * s / 2, -3.0 * s / 2]]))  # per-token A_t, same ratio s


# ---------------------------------------------------------------------------- CISPO: hand values and properties

CISPO_RATIOS = [1.5, 1.1, 0.5, 0.5]
CISPO_ADV = [1.0, 1.0, -1.0, 1.0]
CISPO_OLD = [-1.0, -2.0, -1.0, -0.5]


def test_cispo_hand_values():
    old = t([CISPO_OLD])
    lp = old + t([CISPO_RATIOS]).log()
    loss, grad, stats = run_loss("cispo", lp, old, t([CISPO_ADV]), torch.ones(1, 4))
    w = [1.2, 1.1, 0.8, 0.8]  # clip(r, 0.8, 1.2), detached
    logp = lp[0].tolist()
    assert loss.item() == pytest.approx(-sum(wi * a * lpi for wi, a, lpi in zip(w, CISPO_ADV, logp, strict=True)) / 4)
    close(grad, t([[-1.2 / 4, -1.1 / 4, 0.8 / 4, -0.8 / 4]]))  # -w A / N tokens
    assert stats.clip_fraction.item() == 0.75  # ratios 1.5, 0.5, 0.5 are outside [0.8, 1.2], whatever A's sign


def test_cispo_keeps_the_gradient_ppo_clips_away():
    """Token 0 (A > 0, r = 1.5) and token 2 (A < 0, r = 0.5): PPO's clip removes their gradient; CISPO
    bounds their weight instead and keeps -w A d logp."""
    old = t([CISPO_OLD])
    lp = old + t([CISPO_RATIOS]).log()
    _, ppo_grad, ppo_stats = run_loss("ppo", lp, old, t([CISPO_ADV]), torch.ones(1, 4))
    _, cispo_grad, _ = run_loss("cispo", lp, old, t([CISPO_ADV]), torch.ones(1, 4))
    assert ppo_grad[0, 0].item() == 0.0 and ppo_grad[0, 2].item() == 0.0
    assert ppo_stats.clip_fraction.item() == 0.5
    assert cispo_grad[0, 0].item() == pytest.approx(-1.2 * 1.0 / 4)
    assert cispo_grad[0, 2].item() == pytest.approx(-0.8 * -1.0 / 4)
    assert (cispo_grad != 0).all()


# ---------------------------------------------------------------------------- every loss: loops, padding, ratio 1


def loop_aggregate(terms, mask, mode, constant=None):
    """terms[i][t]: scalar tensors on response tokens. The four modes, spelled out per sequence."""
    rows = [[terms[i][j] for j in range(len(mask[i])) if mask[i][j]] for i in range(len(mask))]
    rows = [r for r in rows if r]
    length = len(mask[0])
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / len(rows)
    norm = length if constant is None else constant
    return sum(sum(r) / norm for r in rows) / len(rows)


def clipped_surrogate(ratio, a, clip_low, clip_high):
    """-min(r A, clip(r) A) written as its cases; the clipped cases are constants (no gradient)."""
    if a > 0 and ratio.item() > 1 + clip_high:
        return torch.tensor(-(1 + clip_high) * a)
    if a < 0 and ratio.item() < 1 - clip_low:
        return torch.tensor(-(1 - clip_low) * a)
    return -ratio * a


def loop_loss(name, lp, old, adv, mask, weights, clip_low, clip_high, agg_mode, dual_clip=None):
    """Each loss as explicit loops over sequences i and tokens j; lp is the (B, T) leaf with grad."""
    old_l, adv_l, m, w = old.tolist(), adv.tolist(), mask.tolist(), weights.tolist()
    terms = [[None] * len(m[0]) for _ in m]
    for i, row in enumerate(m):
        idx = [j for j, keep in enumerate(row) if keep]
        if not idx:
            continue
        if name in ("gspo", "gspo_token"):
            mean_log_ratio = sum(lp[i, j] - old_l[i][j] for j in idx) / len(idx)
        for j in idx:
            if name == "ppo":
                term = clipped_surrogate(torch.exp(lp[i, j] - old_l[i][j]), adv_l[i][j], clip_low, clip_high)
                if dual_clip is not None and adv_l[i][j] < 0 and term.item() > -dual_clip * adv_l[i][j]:
                    term = torch.tensor(-dual_clip * adv_l[i][j])
            elif name == "gspo":
                seq_adv = sum(adv_l[i][k] for k in idx) / len(idx)
                term = clipped_surrogate(torch.exp(mean_log_ratio), seq_adv, clip_low, clip_high)
            elif name == "gspo_token":
                s_ij = torch.exp(mean_log_ratio.detach() + lp[i, j] - lp[i, j].detach())
                term = clipped_surrogate(s_ij, adv_l[i][j], clip_low, clip_high)
            else:  # cispo
                ratio = math.exp(lp[i, j].item() - old_l[i][j])
                term = -min(max(ratio, 1 - clip_low), 1 + clip_high) * adv_l[i][j] * lp[i, j]
            terms[i][j] = term * w[i][j]
    return loop_aggregate(terms, m, agg_mode)


# gspo takes one advantage per sequence (unequal ones: test_gspo_uses_the_mean_of_unequal_token_advantages...)
@pytest.mark.parametrize(("name", "per_token_adv"), [("ppo", False), ("ppo", True), ("gspo", False),
                                                     ("gspo_token", False), ("gspo_token", True), ("cispo", False),
                                                     ("cispo", True)])
@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_loop_formulation(name, per_token_adv, agg_mode, seed):
    mask, old, new, adv, behaviour = random_batch(seed, batch=5, length=5, spread=0.4)
    if per_token_adv:
        adv = torch.randn(adv.shape, generator=torch.Generator().manual_seed(seed + 7))
    weights, _, _ = losses.rollout_correction(old, behaviour, mask, "tis", cap=1.5)
    clip = {"clip_low": 0.05, "clip_high": 0.08} if name.startswith("gspo") else {"clip_low": 0.2, "clip_high": 0.28}
    dual = 2.0 if name == "ppo" else None
    loss, grad, _ = run_loss(name, new, old, adv, mask, agg_mode=agg_mode, is_weights=weights, dual_clip=dual, **clip)
    lp = new.detach().clone().requires_grad_()
    expected = loop_loss(name, lp, old, adv, mask, weights, agg_mode=agg_mode, dual_clip=dual, **clip)
    expected.backward()
    close(loss, expected.detach())
    close(grad, lp.grad)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_at_ratio_one_every_loss_is_the_vanilla_policy_gradient(name, agg_mode):
    """With pi = pi_old and per-sequence advantages, d loss / d logp_t = -A_t times the aggregation's weight
    of token t, for all four losses (GSPO's length normalisation and CISPO's weight both become 1)."""
    mask, old, _, adv, _ = random_batch(3)
    _, grad, stats = run_loss(name, old, old, adv, mask, agg_mode=agg_mode)
    agg_weight = torch.autograd.functional.jacobian(lambda x: losses.aggregate_loss(x, mask, agg_mode), old)
    close(grad, -adv * agg_weight)
    assert stats.clip_fraction.item() == 0.0 and stats.approx_kl.item() == 0.0


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_losses_ignore_padding(name, agg_mode):
    mask, old, new, adv, behaviour = random_batch(5)
    kw = {"agg_mode": agg_mode, "behaviour_logprobs": behaviour, "tis_cap": 2.0, "clip_high": 0.28}
    clean = run_loss(name, new, old, adv, mask, **kw)
    kw["behaviour_logprobs"] = with_garbage(behaviour, mask)
    dirty = run_loss(name, with_garbage(new, mask), with_garbage(old, mask), with_garbage(adv, mask), mask, **kw)
    close(dirty[0], clean[0])
    close(dirty[1], clean[1])
    assert (dirty[1][~mask] == 0).all()
    for field in ("clip_fraction", "approx_kl", "dual_clip_fraction", "tis_weight_mean"):
        close(getattr(dirty[2], field), getattr(clean[2], field))
        assert getattr(clean[2], field).shape == () and not getattr(clean[2], field).requires_grad


@pytest.mark.parametrize("name", ["gspo", "gspo_token", "cispo"])
def test_dual_clip_is_ppo_only(name):
    with pytest.raises(ValueError, match="ppo"):
        losses.get_policy_loss(name)(t([[0.0]]), t([[0.0]]), t([[1.0]]), t([[1]]), dual_clip=3.0)


def test_behaviour_logprobs_and_is_weights_are_one_correction():
    mask, old, new, adv, behaviour = random_batch(6)
    weights, _, _ = losses.rollout_correction(old, behaviour, mask, "tis", cap=2.0)
    for name in LOSSES:
        via_behaviour = run_loss(name, new, old, adv, mask, behaviour_logprobs=behaviour, tis_cap=2.0)
        via_weights = run_loss(name, new, old, adv, mask, is_weights=weights)
        close(via_weights[0], via_behaviour[0])
        close(via_weights[1], via_behaviour[1])
        with pytest.raises(ValueError, match="not both"):
            losses.get_policy_loss(name)(new, old, adv, mask, behaviour_logprobs=behaviour, is_weights=weights)


# ---------------------------------------------------------------------------- rollout correction

# log-ratios old - behaviour: row 0 (ln 3, -ln 2, 0.1), row 1 (0.1, 0.2, padding: 9 - 5 = 4, ignored)
RC_OLD = [[0.0, 0.0, 0.0], [0.0, 0.0, 9.0]]
RC_BEHAVIOUR = [[-LN3, LN2, -0.1], [-0.1, -0.2, 5.0]]
RC_MASK = [[1, 1, 1], [1, 1, 0]]
E1, E2 = math.exp(0.1), math.exp(0.2)


def correct(mode, **kw):
    return losses.rollout_correction(t(RC_OLD), t(RC_BEHAVIOUR), t(RC_MASK), mode, **kw)


def test_rollout_correction_hand_values():
    gap_mean, gap_max = (LN3 + LN2 + 0.1 + 0.1 + 0.2) / 5, LN3
    # none: weight 1 on every response token
    w, m, stats = correct("none")
    close(w, t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    assert m.tolist() == [[True, True, True], [True, True, False]] and stats.corrected_fraction.item() == 0.0
    assert stats.logprob_gap_mean.item() == pytest.approx(gap_mean)
    assert stats.logprob_gap_max.item() == pytest.approx(gap_max)  # the padding's gap of 4 is not counted
    # tis, cap 2: ratios (3 -> 2, 0.5, e^0.1), (e^0.1, e^0.2); one token of five truncated
    w, m, stats = correct("tis", cap=2.0)
    close(w, t([[2.0, 0.5, E1], [E1, E2, 0.0]]))
    assert stats.corrected_fraction.item() == pytest.approx(0.2)
    assert stats.weight_mean.item() == pytest.approx((2.0 + 0.5 + 2 * E1 + E2) / 5)
    # seq_tis, cap 1.5: row 0 exp(ln 3 - ln 2 + 0.1) = 1.5 e^0.1 = 1.658 -> 1.5 (3 tokens); row 1 exp(0.3) = 1.350
    w, m, stats = correct("seq_tis", cap=1.5)
    close(w, t([[1.5, 1.5, 1.5], [math.exp(0.3), math.exp(0.3), 0.0]]))
    assert stats.corrected_fraction.item() == pytest.approx(3 / 5)
    # masked_is, band [0.6, 2]: ratio 3 and 0.5 leave the loss; the others keep their ratio as weight
    w, m, stats = correct("masked_is", low=0.6, high=2.0)
    assert m.tolist() == [[False, False, True], [True, True, False]]
    close(w, t([[0.0, 0.0, E1], [E1, E2, 0.0]]))
    assert stats.corrected_fraction.item() == pytest.approx(2 / 5)
    assert stats.weight_mean.item() == pytest.approx((2 * E1 + E2) / 3)


def test_rollout_correction_errors():
    with pytest.raises(ValueError, match="masked_is, none, seq_tis, tis"):
        correct("icepop")
    with pytest.raises(ValueError, match="cap"):
        correct("seq_tis", cap=None)
    with pytest.raises(ValueError, match="low < high"):
        correct("masked_is", low=2.0, high=0.5)
    w, _, _ = correct("tis", cap=None)  # token TIS may run untruncated (policy_loss's tis_cap=None)
    close(w[0, 0], t(3.0))


def test_seq_tis_does_not_overflow():
    old, behaviour, mask = torch.zeros(1, 400), torch.full((1, 400), -5.0), torch.ones(1, 400)  # exp(2000)
    w, _, stats = losses.rollout_correction(old, behaviour, mask, "seq_tis", cap=2.0)
    assert torch.isfinite(w).all() and (w == 2.0).all() and stats.corrected_fraction.item() == 1.0


def loop_correction(old, behaviour, mask, mode, cap, low, high):
    """Weights and kept-mask as nested lists, from math.exp on each token or sequence."""
    weights, kept = [], []
    for o_row, b_row, m_row in zip(old, behaviour, mask, strict=True):
        seq_ratio = math.exp(sum(o - b for o, b, m in zip(o_row, b_row, m_row, strict=True) if m))
        w_row, k_row = [], []
        for o, b, m in zip(o_row, b_row, m_row, strict=True):
            ratio = math.exp(o - b) if m else 0.0
            if mode == "none":
                w, k = 1.0, bool(m)
            elif mode == "tis":
                w, k = min(ratio, cap), bool(m)
            elif mode == "seq_tis":
                w, k = min(seq_ratio, cap), bool(m)
            else:
                k = bool(m) and low <= ratio <= high
                w = ratio
            w_row.append(w if k else 0.0)
            k_row.append(k)
        weights.append(w_row)
        kept.append(k_row)
    return weights, kept


@pytest.mark.parametrize("mode", list(losses.ROLLOUT_CORRECTIONS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollout_correction_matches_loops_and_ignores_padding(mode, seed):
    mask, old, _, _, behaviour = random_batch(seed, batch=5, length=6)
    behaviour = old + 0.4 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
    old = old.requires_grad_()  # the weights must come back detached anyway
    kw = {"cap": 1.5, "low": 0.7, "high": 1.4}
    w, m, stats = losses.rollout_correction(old, behaviour, mask, mode, **kw)
    exp_w, exp_m = loop_correction(old.tolist(), behaviour.tolist(), mask.tolist(), mode, **kw)
    close(w, t(exp_w))
    assert m.tolist() == exp_m and m.dtype == torch.bool and not w.requires_grad
    gaps = [abs(o - b) for o_r, b_r, m_r in zip(old.tolist(), behaviour.tolist(), mask.tolist(), strict=True)
            for o, b, k in zip(o_r, b_r, m_r, strict=True) if k]
    assert stats.logprob_gap_mean.item() == pytest.approx(statistics.mean(gaps))
    assert stats.logprob_gap_max.item() == pytest.approx(max(gaps))
    # padding holding +GARBAGE and -GARBAGE (a gap of 2e4, exp overflows) changes nothing
    w2, m2, stats2 = losses.rollout_correction(with_garbage(old, mask), with_garbage(-behaviour, mask).neg(), mask,
                                               mode, **kw)
    close(w2, w)
    assert torch.equal(m2, m)
    for field in ("logprob_gap_mean", "logprob_gap_max", "corrected_fraction", "weight_mean"):
        close(getattr(stats2, field), getattr(stats, field))


def test_masked_tokens_leave_the_policy_gradient():
    mask, old, new, adv, behaviour = random_batch(4)
    behaviour = old + t([[1.0, -1.0, 0.0, 0.0, 0.0, 0.0]] * 4)  # ratios e^-1 and e^1 outside [0.5, 2]
    w, kept, _ = losses.rollout_correction(old, behaviour, mask, "masked_is", low=0.5, high=2.0)
    new = old + 0.01 * torch.randn(old.shape, generator=torch.Generator().manual_seed(4))  # inside every clip
    for name in LOSSES:
        _, grad, stats = run_loss(name, new, old, adv, kept, is_weights=w, clip_low=0.2, clip_high=0.2)
        assert (grad[:, :2] == 0).all()
        assert (grad[kept] != 0).any()
        assert stats.tis_weight_mean.item() == pytest.approx(1.0)  # exp(0) on every kept token


# ---------------------------------------------------------------------------- REINFORCE++


def estimate(name, rewards, mask, groups, gamma=1.0, **kw):
    fn = algos.get_advantage_estimator(name)
    return fn(token_rewards=rewards, mask=mask, group_ids=groups, values=None, gamma=gamma, lam=1.0, **kw)


def test_reinforce_pp_hand_values():
    # the -2 on seq 3's first token stands for its KL penalty; the outcome is on each last token
    rewards = t([[0.0, 2.0], [1.0, GARBAGE], [2.0, 0.0], [-2.0, 2.0]])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv, ret = estimate("reinforce_pp", rewards, mask, torch.tensor([0, 0, 1, 1]), gamma=0.5)
    # returns-to-go, gamma 0.5: [0 + 0.5*2, 2], [1], [2 + 0, 0], [-2 + 0.5*2, 2] = [1, 2], [1], [2, 0], [-1, 2]
    close(ret, t([[1.0, 2.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 2.0]]))
    # over the batch's 7 tokens: mean 7/7 = 1; deviations 0, 1, 0, 1, -1, -2, 1: unbiased var 8/6, std 2/sqrt(3)
    k = math.sqrt(3) / 2
    close(adv, t([[0.0, k], [0.0, 0.0], [k, -k], [-2 * k, k]]))


def test_reinforce_pp_baseline_hand_values():
    rewards = t([[0.0, 2.0], [0.0, GARBAGE], [0.0, 3.0], [1.0, 0.0]])
    mask = t([[1, 1], [1, 0], [1, 1], [1, 1]])
    groups = torch.tensor([4, 4, 9, 9])
    adv, ret = estimate("reinforce_pp_baseline", rewards, mask, groups)
    # G (gamma 1): [2, 2], [0], [3, 3], [1, 0]; sequence rewards 2, 0 | 3, 1 -> group means 1 | 2
    close(ret, t([[2.0, 2.0], [0.0, 0.0], [3.0, 3.0], [1.0, 0.0]]))
    # G - mean: [1, 1], [-1], [1, 1], [-1, -2]: batch mean 0, squares 10 -> unbiased var 10/6, std sqrt(5/3)
    s = math.sqrt(5 / 3)
    close(adv, t([[1 / s, 1 / s], [-1 / s, 0.0], [1 / s, 1 / s], [-1 / s, -2 / s]]))
    # OpenRLHF's exact baseline with the KL in the reward: the group mean of the outcome reward alone.
    # Outcomes 3, 0 | 3, 0, so the rest of each row is its KL penalty (seq 0: -1 on the last token; seq 3: +1
    # on the first); group means 1.5 | 1.5 -> G - 1.5 = [0.5, 0.5], [-1.5], [1.5, 1.5], [-0.5, -1.5]
    adv, _ = estimate("reinforce_pp_baseline", rewards, mask, groups, outcome_rewards=t([3.0, 0.0, 3.0, 0.0]))
    raw = [0.5, 0.5, -1.5, 1.5, 1.5, -0.5, -1.5]
    mu, sd = statistics.mean(raw), statistics.stdev(raw)
    close(adv[mask.bool()], t([(r - mu) / sd for r in raw]))


def loop_reinforce_pp(rewards, mask, groups, gamma, baseline, outcomes=None):
    """OpenRLHF's order of operations, in loops: (outcome - group mean) on the last token, plus the per-token
    rest (the KL penalty), returns-to-go, then (x - mean) / std over every token of the batch."""
    seq = [sum(r for r, m in zip(rr, mm, strict=True) if m) for rr, mm in zip(rewards, mask, strict=True)]
    score = outcomes if outcomes is not None else seq
    raw = {}
    for i, (row, m_row) in enumerate(zip(rewards, mask, strict=True)):
        b = statistics.mean(score[k] for k in range(len(score)) if groups[k] == groups[i]) if baseline else 0.0
        idx = [j for j, m in enumerate(m_row) if m]
        shaped = {j: row[j] for j in idx}
        shaped[idx[-1]] -= b  # the baseline enters with the outcome, on the last token (gamma = 1 for baseline)
        g = 0.0
        for j in reversed(idx):
            g = shaped[j] + gamma * g
            raw[(i, j)] = g
    mu, sd = statistics.mean(raw.values()), statistics.stdev(raw.values())
    out = [[0.0] * len(mask[0]) for _ in mask]
    for (i, j), a in raw.items():
        out[i][j] = (a - mu) / math.sqrt(sd**2 + 1e-8)
    return out


@pytest.mark.parametrize(("name", "gamma", "outcome_given"), [
    ("reinforce_pp", 1.0, False), ("reinforce_pp", 0.9, False),
    ("reinforce_pp_baseline", 1.0, False), ("reinforce_pp_baseline", 1.0, True),
])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_matches_loop_formulation(name, gamma, outcome_given, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(8, 5, gen)
    outcomes = torch.randn(8, generator=gen)
    kl = 0.3 * torch.randn(8, 5, generator=gen)
    rewards = algos.token_rewards_with_kl(outcomes, kl, mask, kl_coef=0.5)  # KL per token, outcome on the last
    groups = torch.tensor([3, 3, 3, 3, 8, 8, 8, 8])
    kw = {"outcome_rewards": outcomes} if outcome_given else {}
    adv, _ = estimate(name, with_garbage(rewards, mask), mask, groups, gamma=gamma, **kw)
    expected = loop_reinforce_pp(rewards.tolist(), mask.tolist(), groups.tolist(), gamma,
                                 baseline=name.endswith("baseline"), outcomes=outcomes.tolist() if kw else None)
    close(adv, t(expected))


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_normalises_over_the_batch_not_the_group(name):
    gen = torch.Generator().manual_seed(11)
    mask = random_mask(6, 4, gen)
    rewards = torch.randn(6, 4, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    adv, ret = estimate(name, rewards, mask, groups, gamma=0.9)
    real = adv[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert real.std().item() == pytest.approx(1.0, abs=1e-6)  # unit std over the batch ...
    assert abs(adv[:3][mask[:3]].std().item() - 1.0) > 1e-3  # ... not within a group
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=2, max_size=2), st.integers(0, 1000))
def test_reinforce_pp_baseline_ignores_a_per_group_reward_shift(shifts, seed):
    """The group mean absorbs any constant added to one group's outcome rewards (gamma 1)."""
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(6, 4, gen)
    rewards = torch.randn(6, 4, generator=gen)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    shifted = rewards + algos.place_reward_on_last_token(t(shifts)[groups], mask)
    a, _ = estimate("reinforce_pp_baseline", rewards, mask, groups)
    b, _ = estimate("reinforce_pp_baseline", shifted, mask, groups)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
