"""Tests for learner/losses.py: hand-computed values, gradient checks, padding ignored, and the textbook
mistakes pinned (the ratio per sampled token, clipped tokens without gradient, DPO on sequence sums)."""

import math

import pytest
import torch

from learner import algos, losses
from tests.learner.tensors import GARBAGE, random_mask, t, with_garbage

pytestmark = pytest.mark.usefixtures("float64")  # the whole module (tests/learner/conftest.py)


# ---------------------------------------------------------------------------- KL loss


def test_kl_loss_is_aggregated_estimate():
    logp, ref = t([[-1.0, -2.0, 5.0]]), t([[-1.5, -1.0, 7.0]])
    mask = t([[1, 1, 0]])
    d = [-0.5, 1.0]
    expected = sum(math.exp(v) - v - 1 for v in d) / 2
    assert losses.kl_loss(logp, ref, mask, "k3").item() == pytest.approx(expected)
    assert losses.kl_loss(logp, ref, mask, "k1", "seq-mean-token-sum").item() == pytest.approx(0.5 - 1.0)


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
    assert losses.aggregate_loss(t(LOSS), t(LOSS_MASK), mode, constant).item() == pytest.approx(expected)


def test_aggregate_loss_mode_changes_the_gradient():
    grads = {}
    for mode in losses.AGG_MODES:
        loss_mat = t(LOSS).requires_grad_()
        losses.aggregate_loss(loss_mat, t(LOSS_MASK), mode).backward()
        grads[mode] = loss_mat.grad
    torch.testing.assert_close(grads["token-mean"], t([[0.25] * 3, [0.25, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-sum"], t([[0.5] * 3, [0.5, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-mean"], t([[1 / 6] * 3, [0.5, 0, 0]]))
    torch.testing.assert_close(grads["seq-mean-token-sum-norm"], t([[1 / 6] * 3, [1 / 6, 0, 0]]))


def test_aggregate_loss_unknown_mode():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm, token-mean"):
        losses.aggregate_loss(t(LOSS), t(LOSS_MASK), "sum")


# ---------------------------------------------------------------------------- policy loss


def one_token(logprob_minus_old, advantage, **kw):
    lp = t([[logprob_minus_old]])
    return losses.policy_loss(lp, t([[0.0]]), t([[advantage]]), t([[1]]), **kw)


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
    loss, stats = losses.policy_loss(lp, old, t([[1.0]]), t([[1]]))
    assert loss.item() == pytest.approx(-1.2)
    assert stats.clip_fraction.item() == 1.0
    full_vocab_ratio = (new_logits.softmax(-1) / old_logits.softmax(-1)).mean()
    assert full_vocab_ratio.item() == pytest.approx(1.0)
    # two tokens, A = +1, ratios 1.5 and 0.5 -> mean(-1.2, -0.5), not -mean ratio = -1
    loss, _ = losses.policy_loss(t([[math.log(1.5), math.log(0.5)]]), t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[1, 1]]))
    assert loss.item() == pytest.approx(-0.85)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_policy_gradient_at_ratio_one_is_vanilla_policy_gradient(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = random_mask(4, 6, gen)
    old = -torch.rand(4, 6, generator=gen) * 3
    adv = torch.randn(4, 6, generator=gen)
    lp = old.clone().requires_grad_()
    loss, stats = losses.policy_loss(lp, old, adv, mask, dual_clip=3.0)
    loss.backward()
    n = mask.sum()
    torch.testing.assert_close(lp.grad, -adv * mask / n)
    assert stats.clip_fraction.item() == 0.0 and stats.approx_kl.item() == 0.0


def test_clipped_tokens_contribute_zero_gradient():
    ratios = t([[1.5, 1.1, 0.5, 0.5, 3.0]])
    adv = t([[1.0, 1.0, -1.0, 1.0, -1.0]])
    lp = ratios.log().requires_grad_()
    loss, _ = losses.policy_loss(lp, torch.zeros(1, 5), adv, torch.ones(1, 5), dual_clip=2.0)
    loss.backward()
    # token 0 clipped (A>0, r>1.2), token 2 clipped (A<0, r<0.8), token 4 dual-clipped: zero gradient.
    # others: d(-A r)/d logp = -A r, divided by 5 tokens
    torch.testing.assert_close(lp.grad, t([[0.0, -1.1 / 5, 0.0, -0.5 / 5, 0.0]]))


def test_truncated_importance_sampling_hand_values():
    lp = t([[0.0, 0.0]]).requires_grad_()
    old = t([[0.0, 0.0]])
    behaviour = t([[-math.log(3.0), math.log(2.0)]])  # weights exp(old - behaviour) = 3 -> capped 2, and 0.5
    loss, stats = losses.policy_loss(lp, old, t([[1.0, 1.0]]), t([[1, 1]]), behaviour_logprobs=behaviour, tis_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert stats.tis_weight_mean.item() == pytest.approx(1.25)
    loss.backward()
    torch.testing.assert_close(lp.grad, t([[-1.0, -0.25]]))  # -A * w / N, weight detached
    uncapped, stats = losses.policy_loss(lp, old, t([[1.0, 1.0]]), t([[1, 1]]), behaviour_logprobs=behaviour)
    assert uncapped.item() == pytest.approx(-(3.0 + 0.5) / 2)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        one_token(0.0, 1.0, dual_clip=0.9)


@pytest.mark.parametrize("agg_mode", list(losses.AGG_MODES))
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
        loss, stats = losses.policy_loss(lp, fill(old), fill(adv), mask, behaviour_logprobs=fill(behaviour), **kw)
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
        vl, frac = losses.value_loss(v, fill(old), fill(ret), mask, clip=0.2, agg_mode="seq-mean-token-mean")
        kl = losses.kl_loss(v, fill(ref).clamp(max=50), mask, "k2")  # v as logprobs; k2 stays finite
        (vl + kl).backward()
        return vl, frac, kl, v.grad

    for a, b in zip(run(False), run(True), strict=True):
        torch.testing.assert_close(a, b)


def test_metrics_helpers_hand_values():
    lp, old = t([[math.log(1.5), math.log(0.5), 9.0]]), t([[0.0, 0.0, 0.0]])
    adv, mask = t([[1.0, 1.0, 1.0]]), t([[1, 1, 0]])
    assert losses.clip_fraction(lp, old, adv, mask).item() == 0.5
    expected_kl = ((1.5 - 1 - math.log(1.5)) + (0.5 - 1 - math.log(0.5))) / 2
    assert losses.approx_kl(lp, old, mask).item() == pytest.approx(expected_kl)
    ret, mask = t([[1.0, 2.0, 3.0, GARBAGE]]), t([[1, 1, 1, 0]])
    # R - V = (0, 0, 1): unbiased var 1/3; Var[R] = 1 -> 2/3
    assert losses.explained_variance(t([[1.0, 2.0, 2.0, 0.0]]), ret, mask).item() == pytest.approx(2 / 3)
    assert losses.explained_variance(ret, ret, mask).item() == pytest.approx(1.0)


# ---------------------------------------------------------------------------- value loss


def test_value_loss_hand_values():
    v, old, ret, mask = t([[1.5, 7.0]]), t([[1.0, 3.0]]), t([[2.0, -5.0]]), t([[1, 0]])
    loss, frac = losses.value_loss(v, old, ret, mask)
    assert loss.item() == pytest.approx(0.5 * 0.25) and frac.item() == 0.0
    # clipped value 1.2 -> (1.2 - 2)^2 = 0.64 > 0.25 -> 0.5 * 0.64
    loss, frac = losses.value_loss(v, old, ret, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0
    # moving away from the return is not clipped: v = 2.5 -> (0.5)^2 vs clipped 1.2 -> 0.64
    v_grad = t([[2.5, 7.0]]).requires_grad_()
    loss, frac = losses.value_loss(v_grad, old, ret, mask, clip=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.32) and frac.item() == 1.0
    assert v_grad.grad.tolist() == [[0.0, 0.0]]  # the clipped branch is active: no gradient


# ---------------------------------------------------------------------------- offline objectives


def test_bradley_terry_and_accuracy_hand_values():
    chosen, rejected = t([1.0, 0.0]), t([0.0, 0.0])
    softplus = lambda x: math.log1p(math.exp(x))  # -logsigmoid(x) = softplus(-x)  # noqa: E731
    assert losses.bradley_terry_loss(chosen, rejected).item() == pytest.approx((softplus(-1) + softplus(0)) / 2)
    assert losses.bradley_terry_loss(chosen, rejected, margin=1.0).item() == pytest.approx(
        (softplus(0) + softplus(1)) / 2
    )
    assert losses.bradley_terry_loss(chosen, rejected, margin=t([1.0, 0.0])).item() == pytest.approx(softplus(0))
    assert losses.pairwise_accuracy(chosen, rejected).item() == 0.5


def test_sequence_logprobs_sum_and_mean():
    lp, mask = t([[-1.0, -2.0, -3.0], [-1.0, GARBAGE, GARBAGE]]), t([[1, 1, 1], [1, 0, 0]])
    assert losses.sequence_logprobs(lp, mask).tolist() == [-6.0, -1.0]
    assert losses.sequence_logprobs(lp, mask, length_normalize=True).tolist() == [-2.0, -1.0]


def test_dpo_uses_the_sequence_sum_not_the_length_normalised_mean():
    """Textbook mistake pinned: DPO's log pi(y|x) is the SUM of token log-probs. With a 3-token chosen
    and a 1-token rejected answer the two formulations give different losses."""
    pol_c, ref_c = t([[-1.0, -1.0, -1.0]]), t([[-2.0, -2.0, -2.0]])  # +1 per token
    pol_r, ref_r = t([[-1.0, 0.0, 0.0]]), t([[-1.5, 0.0, 0.0]])  # +0.5, one token
    mask_c, mask_r = t([[1, 1, 1]]), t([[1, 0, 0]])

    def loss(norm):
        s = lambda x, m: losses.sequence_logprobs(x, m, length_normalize=norm)  # noqa: E731
        return losses.dpo_loss(s(pol_c, mask_c), s(pol_r, mask_r), s(ref_c, mask_c), s(ref_r, mask_r), beta=1.0)[0]

    assert loss(False).item() == pytest.approx(math.log1p(math.exp(-(3.0 - 0.5))))  # h = 2.5
    assert loss(True).item() == pytest.approx(math.log1p(math.exp(-(1.0 - 0.5))))  # h = 0.5
    assert loss(False).item() != pytest.approx(loss(True).item())


def test_dpo_hand_values_and_gradient():
    pc, pr = t([-1.0]).requires_grad_(), t([-2.0])
    rc, rr = t([-1.5]), t([-1.5])  # h = 0.5 - (-0.5) = 1
    loss, chosen, rejected = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.1)))  # -beta * sigmoid(-beta h)
    smooth, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    # 0.9 * softplus(-0.1) + 0.1 * softplus(0.1)
    assert smooth.item() == pytest.approx(0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1)))
    ipo, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.0 - 5.0) ** 2)
    with pytest.raises(ValueError, match="ipo, sigmoid"):
        losses.dpo_loss(pc, pr, rc, rr, loss_type="kto")


def test_rwr_weights_hand_values():
    a = 1 / math.sqrt(2)  # rewards (0, 1) whitened with unbiased std sqrt(1/2): z = -+a
    w = losses.rwr_weights(t([0.0, 1.0]))
    denom = math.exp(-a) + math.exp(a)
    torch.testing.assert_close(w, t([2 * math.exp(-a) / denom, 2 * math.exp(a) / denom]))
    torch.testing.assert_close(losses.rwr_weights(t([0.0, 1.0]), top_fraction=0.5), t([0.0, 2.0]))
    torch.testing.assert_close(losses.rwr_weights(t([3.0, 3.0, 3.0])), t([1.0, 1.0, 1.0]))
    sharp = losses.rwr_weights(t([0.0, 1.0, 2.0, 3.0]), beta=0.01)  # overflow-safe, mass on the best
    assert torch.isfinite(sharp).all() and sharp.mean().item() == pytest.approx(1.0)
    assert sharp[-1].item() == pytest.approx(4.0)
