"""The algorithm core of Relay, part two: the losses, built on ``learner/algos.py``.

Loss aggregation, the KL loss, the sampler/learner rollout correction, the policy losses, the value loss
and its diagnostics, and the offline objectives (Bradley-Terry, DPO/IPO, reward-weighted regression).
Pure tensor-in, tensor-out functions with the conventions of ``learner/algos.py`` (binary `(B, T)`
masks, per-token log-probabilities of the sampled token, no distributed reductions), and these:
- "seq-mean-*" aggregation averages over sequences that have at least one response token.
- Policy losses (ppo, gspo, gspo_token, cispo) share one signature and are chosen by name
  (`get_policy_loss`); every one reduces its per-token matrix with `aggregate_loss`, GSPO by placing the
  sequence's term on each of its tokens. The sampler/learner correction is a separate step
  (`rollout_correction`) whose detached weights and mask the losses take as `is_weights` and `mask`.
- No numerical clamps on log-ratios beyond the ones each paper defines (verl clamps GSPO's at 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from learner.algos import (
    AllSum,
    Tensor,
    broadcast_to_tokens,
    entropy_from_logits,
    kl_estimate,
    lookup,
    masked_mean,
    masked_sum,
    masked_var,
    registrar,
)

# ---------------------------------------------------------------------------- loss aggregation


def _nonempty_rows(mask: Tensor) -> Tensor:
    return mask.bool().any(dim=-1)


def _token_mean(loss_mat: Tensor, mask: Tensor, constant: float | None) -> Tensor:
    return masked_mean(loss_mat, mask)


def _seq_mean(per_seq: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(per_seq, _nonempty_rows(mask))


def _seq_mean_token_sum(loss_mat: Tensor, mask: Tensor, constant: float | None) -> Tensor:
    return _seq_mean(masked_sum(loss_mat, mask, dim=-1), mask)


def _seq_mean_token_mean(loss_mat: Tensor, mask: Tensor, constant: float | None) -> Tensor:
    return _seq_mean(masked_mean(loss_mat, mask, dim=-1), mask)


def _seq_mean_token_sum_norm(loss_mat: Tensor, mask: Tensor, constant: float | None) -> Tensor:
    norm = float(mask.shape[-1]) if constant is None else float(constant)
    return _seq_mean(masked_sum(loss_mat, mask, dim=-1) / norm, mask)


AGG_MODES: dict[str, Callable[[Tensor, Tensor, float | None], Tensor]] = {
    "token-mean": _token_mean,  # DAPO (Yu et al. 2025): every token weighs the same
    "seq-mean-token-sum": _seq_mean_token_sum,
    "seq-mean-token-mean": _seq_mean_token_mean,  # original GRPO (Shao et al. 2024)
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,  # Dr.GRPO (Liu et al. 2025): sum / constant
}


def aggregate_loss(loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", constant: float | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    loss_mat: (B, T); mask: (B, T) -> scalar. Modes: token-mean (sum / #tokens), seq-mean-token-sum,
    seq-mean-token-mean, seq-mean-token-sum-norm (token sum / constant, default T = max length).
    """
    return lookup(AGG_MODES, mode, "loss aggregation mode")(loss_mat, mask, constant)


def kl_loss(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: str = "k3", agg_mode: str = "token-mean",
    loss_norm_constant: float | None = None,
) -> Tensor:
    """KL-in-the-loss term (GRPO, Shao et al. 2024 eq. 4 uses k3), aggregated to a scalar.

    logprobs, ref_logprobs, mask: (B, T) -> scalar. The trainer adds coef * this to the loss.
    """
    return aggregate_loss(kl_estimate(logprobs, ref_logprobs, kind), mask, agg_mode, loss_norm_constant)


# ---------------------------------------------------------------------------- rollout correction


@dataclass
class RolloutCorrectionStats:
    """Detached scalar diagnostics of the sampler/learner mismatch, over the response tokens."""

    logprob_gap_mean: Tensor  # () mean |old - behaviour| (the sampler/learner log-prob gap)
    logprob_gap_max: Tensor  # () max |old - behaviour| (0 without response tokens)
    corrected_fraction: Tensor  # () fraction of response tokens truncated (tis, seq_tis) or masked out (masked_is)
    weight_mean: Tensor  # () mean weight over the tokens left in the loss (1 for none)


CorrectionFn = Callable[[Tensor, Tensor, float | None, float, float], tuple[Tensor, Tensor, Tensor]]


def _no_correction(log_ratio: Tensor, m: Tensor, cap: float | None, low: float, high: float):
    return torch.ones_like(log_ratio), m, torch.zeros_like(m)


def _token_tis(log_ratio: Tensor, m: Tensor, cap: float | None, low: float, high: float):
    weight = torch.exp(log_ratio)
    if cap is None:
        return weight, m, torch.zeros_like(m)
    return weight.clamp(max=cap), m, m & (weight > cap)


def _seq_tis(log_ratio: Tensor, m: Tensor, cap: float | None, low: float, high: float):
    if cap is None:
        raise ValueError("seq_tis needs a cap: an untruncated sequence weight is a product of T token ratios")
    seq_log = log_ratio.sum(-1, keepdim=True)  # (B, 1); padding holds 0
    log_cap = math.log(cap)
    weight = torch.exp(seq_log.clamp(max=log_cap)).expand_as(log_ratio)  # in log space: no overflow
    return weight, m, m & (seq_log > log_cap)


def _masked_is(log_ratio: Tensor, m: Tensor, cap: float | None, low: float, high: float):
    if not 0 < low < high:
        raise ValueError(f"masked_is needs 0 < low < high, got low={low}, high={high}")
    inside = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))
    keep = m & inside
    return torch.exp(torch.where(inside, log_ratio, 0.0)), keep, m & ~inside


ROLLOUT_CORRECTIONS: dict[str, CorrectionFn] = {
    "none": _no_correction,
    "tis": _token_tis,
    "seq_tis": _seq_tis,
    "masked_is": _masked_is,
}


def rollout_correction(
    old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, mode: str = "tis", *,
    cap: float | None = 2.0, low: float = 0.5, high: float = 2.0,
) -> tuple[Tensor, Tensor, RolloutCorrectionStats]:
    """Importance weights for the gap between the sampler (vLLM) and the learner's pi_old.

    old_logprobs, behaviour_logprobs, mask: (B, T) -> (weights (B, T) detached, 0 off the returned mask;
    mask (B, T) bool, the tokens left in the loss; stats). rho_t = exp(old_t - behaviour_t).
    - none: weight 1.
    - tis: w_t = min(rho_t, cap), cap=None untruncated (truncated IS: Yao et al. 2025, "Your Efficient RL
      Framework Secretly Brings You Off-Policy RL Training", fengyao.notion.site/off-policy-rl).
    - seq_tis: w_i = min(prod_t rho_t, cap) = min(exp(sum_t (old - behaviour)), cap) on every token of
      sequence i (Seq-TIS: Liu, Li et al. 2025, "When Speed Kills Stability", richardli.xyz/rl-collapse).
    - masked_is: tokens with rho_t outside [low, high] leave the loss; the others keep the IS weight rho_t,
      as IcePop's M(k) = k inside the band, 0 outside (Ling Team 2025, Ring-1T, arXiv:2510.18855; IcePop
      used [0.5, 5]; the "Small Leak Can Sink a Great Ship" blog). Masking rather than truncating drops the
      tokens whose ratio says the engines disagree.
    Multiply each token's policy loss by the weights (pass them as `is_weights`) and aggregate with the mask.
    """
    m = mask.bool()
    log_ratio = torch.where(m, old_logprobs - behaviour_logprobs, 0.0).detach()
    weight, keep, corrected = lookup(ROLLOUT_CORRECTIONS, mode, "rollout correction")(log_ratio, m, cap, low, high)
    weight = torch.where(keep, weight, 0.0)
    gap = log_ratio.abs()
    stats = RolloutCorrectionStats(
        logprob_gap_mean=masked_mean(gap, m),
        logprob_gap_max=gap.max() if gap.numel() else gap.new_zeros(()),
        corrected_fraction=masked_mean(corrected.to(gap.dtype), m),
        weight_mean=masked_mean(weight, keep),
    )
    return weight, keep, stats


# ---------------------------------------------------------------------------- policy losses


@dataclass
class PolicyLossStats:
    """Detached scalar diagnostics of one policy-loss call."""

    clip_fraction: Tensor  # () share clipped: see each loss (ppo, gspo_token: tokens; gspo: sequences; cispo: weights)
    approx_kl: Tensor  # () k3 estimate of KL(old || new), per token
    dual_clip_fraction: Tensor  # () fraction of tokens capped by the dual clip (ppo only; 0 otherwise)
    tis_weight_mean: Tensor  # () mean rollout-correction weight over the loss's tokens (1 without correction)


PolicyLossFn = Callable[..., tuple[Tensor, PolicyLossStats]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator: register a policy loss under `name` in POLICY_LOSSES.

    Every loss takes logprobs (B, T) with grad, old_logprobs (B, T), advantages (B, T), mask (B, T) and the
    keyword-only clip_low, clip_high, dual_clip, agg_mode, loss_norm_constant, behaviour_logprobs (B, T),
    tis_cap, is_weights (B, T), and returns (loss scalar, PolicyLossStats).
    """

    return registrar(POLICY_LOSSES, name, "policy loss")


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as `name`; ValueError listing valid names otherwise."""
    return lookup(POLICY_LOSSES, name, "policy loss")


def _clipped(ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float) -> Tensor:
    """Bool (B, T): the clipped surrogate is the active (gradient-free) branch."""
    return ((advantages > 0) & (ratio > 1 + clip_high)) | ((advantages < 0) & (ratio < 1 - clip_low))


def clip_fraction(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2,
) -> Tensor:
    """Fraction of response tokens where the PPO clip is active. All inputs (B, T) -> scalar."""
    ratio = torch.exp(logprobs - old_logprobs)
    return masked_mean(_clipped(ratio, advantages, clip_low, clip_high).float(), mask).detach()


def approx_kl(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(pi_old || pi) on tokens sampled from pi_old (Schulman's blog).

    logprobs, old_logprobs, mask: (B, T) -> detached scalar.
    """
    return masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask).detach()


def _loss_weights(
    old_logprobs: Tensor, mask: Tensor, behaviour_logprobs: Tensor | None, tis_cap: float | None,
    is_weights: Tensor | None,
) -> Tensor:
    """Detached (B, T) weights on each token's loss: is_weights, token TIS from behaviour_logprobs, or ones."""
    if behaviour_logprobs is not None and is_weights is not None:
        raise ValueError("give behaviour_logprobs (token TIS with tis_cap) or is_weights (from rollout_correction), "
                         "not both")
    if is_weights is not None:
        return is_weights.detach()
    if behaviour_logprobs is not None:
        return rollout_correction(old_logprobs, behaviour_logprobs, mask, "tis", cap=tis_cap)[0]
    return torch.ones_like(old_logprobs)


def _only_ppo_has_dual_clip(name: str, dual_clip: float | None) -> None:
    if dual_clip is not None:
        raise ValueError(f"dual_clip applies to the ppo loss only, not {name}; pass dual_clip=None")


def _stats(clip_frac: Tensor, logprobs: Tensor, old_logprobs: Tensor, mask: Tensor, weight: Tensor,
           dual: Tensor | None = None) -> PolicyLossStats:
    zero = clip_frac.new_zeros(())
    return PolicyLossStats(
        clip_fraction=clip_frac.detach(),
        approx_kl=approx_kl(logprobs, old_logprobs, mask),
        dual_clip_fraction=zero if dual is None else masked_mean(dual.float(), mask).detach(),
        tis_weight_mean=masked_mean(weight, mask).detach(),
    )


@register_policy_loss("ppo")
def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, agg_mode: str = "token-mean",
    loss_norm_constant: float | None = None, behaviour_logprobs: Tensor | None = None, tis_cap: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """PPO clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, eq. 7), per sampled token.

    logprobs (grad), old_logprobs, advantages, mask, behaviour_logprobs, is_weights: (B, T) -> (scalar, stats).
    ratio_t = exp(logprobs_t - old_logprobs_t) for the sampled token only.
    clip range [1 - clip_low, 1 + clip_high]: clip-higher (DAPO, Yu et al. 2025, arXiv:2503.14476).
    dual_clip c > 1: for A < 0 the loss is capped at c * |A| (Ye et al. 2020, arXiv:1912.09729).
    behaviour_logprobs (the sampler's, e.g. vLLM): each token's loss is multiplied by the detached
    weight min(exp(old - behaviour), tis_cap) (TIS, Yao et al. 2025; tis_cap=None: untruncated).
    is_weights: detached weights from `rollout_correction` instead (any mode; pass its mask as mask).
    clip_fraction: tokens where the clipped branch is active, i.e. the clip removed the gradient.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    surr = -advantages * ratio
    surr_clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss_mat = torch.maximum(surr, surr_clipped)
    dual = torch.zeros_like(mask, dtype=torch.bool)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        dual = (advantages < 0) & (loss_mat > -dual_clip * advantages)
        loss_mat = torch.where(dual, -dual_clip * advantages, loss_mat)
    weight = _loss_weights(old_logprobs, mask, behaviour_logprobs, tis_cap, is_weights)
    loss_mat = loss_mat * weight
    clip_frac = masked_mean(_clipped(ratio, advantages, clip_low, clip_high).float(), mask)
    stats = _stats(clip_frac, logprobs, old_logprobs, mask, weight, dual)
    return aggregate_loss(loss_mat, mask, agg_mode, loss_norm_constant), stats


@register_policy_loss("gspo")
def gspo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 3e-4, clip_high: float = 4e-4, dual_clip: float | None = None,
    agg_mode: str = "seq-mean-token-mean", loss_norm_constant: float | None = None,
    behaviour_logprobs: Tensor | None = None, tis_cap: float | None = None, is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", arXiv:2507.18071, sec. 4.1).

    logprobs (grad), old_logprobs, advantages, mask, behaviour_logprobs, is_weights: (B, T) -> (scalar, stats).
    s_i = exp((1/|y_i|) sum_t (logprobs - old_logprobs)): one length-normalised ratio per sequence;
    A_i = the sequence's advantage (the mean of its per-token advantages, which outcome estimators make
    equal); l_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i), clipped per sequence (the
    paper's ranges, 3e-4 and 4e-4, are the defaults). Aggregation: l_i (times each token's correction
    weight) is placed on every token of sequence i and reduced with agg_mode; "seq-mean-token-mean" is the
    paper's (1/G) sum_i l_i, "token-mean" weights each sequence by its length (verl always uses the former).
    Correction weights: a per-sequence one (seq_tis) scales l_i; per-token ones enter as their mean over the
    sequence (seq-mean-token-mean), where gspo_token (and verl's gspo) weighs each token's gradient instead.
    A mask that drops tokens (masked_is) also drops them from s_i's mean.
    clip_fraction: SEQUENCES (with tokens) whose clip is active. dual_clip is not defined for it.
    """
    _only_ppo_has_dual_clip("gspo", dual_clip)
    m = mask.bool()
    seq_ratio = torch.exp(masked_mean(torch.where(m, logprobs - old_logprobs, 0.0), m, dim=-1))  # (B,)
    seq_adv = masked_mean(advantages, m, dim=-1)  # (B,)
    seq_loss = torch.maximum(-seq_adv * seq_ratio, -seq_adv * seq_ratio.clamp(1 - clip_low, 1 + clip_high))
    weight = _loss_weights(old_logprobs, mask, behaviour_logprobs, tis_cap, is_weights)
    loss_mat = broadcast_to_tokens(seq_loss, m) * weight
    clipped = _clipped(seq_ratio, seq_adv, clip_low, clip_high)
    stats = _stats(masked_mean(clipped.float(), _nonempty_rows(m)), logprobs, old_logprobs, mask, weight)
    return aggregate_loss(loss_mat, mask, agg_mode, loss_norm_constant), stats


@register_policy_loss("gspo_token")
def gspo_token_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 3e-4, clip_high: float = 4e-4, dual_clip: float | None = None,
    agg_mode: str = "seq-mean-token-mean", loss_norm_constant: float | None = None,
    behaviour_logprobs: Tensor | None = None, tis_cap: float | None = None, is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """GSPO-token (Zheng et al. 2025, arXiv:2507.18071, sec. 4.3): GSPO with per-token advantages.

    logprobs (grad), old_logprobs, advantages, mask, behaviour_logprobs, is_weights: (B, T) -> (scalar, stats).
    s_{i,t} = sg[s_i] * exp(logprobs_t - sg[logprobs_t]): its value is the sequence ratio s_i, its gradient
    s_i * grad logprobs_t. Loss per token -min(s_{i,t} A_{i,t}, clip(s_{i,t}) A_{i,t}), reduced with agg_mode
    ("seq-mean-token-mean" is the paper's). With A_{i,t} = A_i (and correction weights constant within each
    sequence: none, seq_tis) it equals gspo in value and gradient.
    clip_fraction: TOKENS whose clip is active (all of a sequence's tokens together when A is per sequence).
    """
    _only_ppo_has_dual_clip("gspo_token", dual_clip)
    m = mask.bool()
    seq_log_ratio = masked_mean(torch.where(m, logprobs - old_logprobs, 0.0), m, dim=-1).detach()  # (B,)
    log_ratio = torch.where(m, seq_log_ratio.unsqueeze(-1) + logprobs - logprobs.detach(), 0.0)
    ratio = torch.exp(log_ratio)  # (B, T), value s_i on every token of sequence i
    loss_mat = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_low, 1 + clip_high))
    weight = _loss_weights(old_logprobs, mask, behaviour_logprobs, tis_cap, is_weights)
    loss_mat = loss_mat * weight
    clip_frac = masked_mean(_clipped(ratio, advantages, clip_low, clip_high).float(), m)
    stats = _stats(clip_frac, logprobs, old_logprobs, mask, weight)
    return aggregate_loss(loss_mat, mask, agg_mode, loss_norm_constant), stats


@register_policy_loss("cispo")
def cispo_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, agg_mode: str = "token-mean",
    loss_norm_constant: float | None = None, behaviour_logprobs: Tensor | None = None, tis_cap: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """CISPO (MiniMax-M1, MiniMax 2025, arXiv:2506.13585, sec. 3): REINFORCE with a clipped,
    detached importance weight.

    logprobs (grad), old_logprobs, advantages, mask, behaviour_logprobs, is_weights: (B, T) -> (scalar, stats).
    Loss per token -sg(clip(r_t, 1 - clip_low, 1 + clip_high)) * A_t * logprobs_t, r_t = exp(logprobs - old):
    the clip bounds the weight, never removes a token's gradient (-w_t A_t grad logprobs_t). The paper
    aggregates over all tokens of the batch (agg_mode "token-mean") and sets no lower bound (clip_low -> 1).
    The loss VALUE is not comparable with ppo's (it holds log-probs, not ratios); its gradient is.
    clip_fraction: tokens whose weight was clipped (r_t outside the band), whatever the sign of A_t.
    """
    _only_ppo_has_dual_clip("cispo", dual_clip)
    m = mask.bool()
    ratio = torch.exp(torch.where(m, logprobs - old_logprobs, 0.0))
    is_weight = ratio.clamp(1 - clip_low, 1 + clip_high).detach()
    weight = _loss_weights(old_logprobs, mask, behaviour_logprobs, tis_cap, is_weights)
    loss_mat = -is_weight * advantages * torch.where(m, logprobs, 0.0) * weight
    outside = m & ((ratio < 1 - clip_low) | (ratio > 1 + clip_high))
    stats = _stats(masked_mean(outside.float(), m), logprobs, old_logprobs, mask, weight)
    return aggregate_loss(loss_mat, mask, agg_mode, loss_norm_constant), stats


@register_policy_loss("nll")
def nll_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
    clip_low: float = 0.2, clip_high: float = 0.2, dual_clip: float | None = None, agg_mode: str = "token-mean",
    loss_norm_constant: float | None = None, behaviour_logprobs: Tensor | None = None, tis_cap: float | None = None,
    is_weights: Tensor | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Weighted negative log-likelihood: loss per token -A_t * logprobs_t (times the rollout correction's
    detached weight), no ratio and no clip; with the "rwr" estimator's weights this is reward-weighted
    regression (Peters & Schaal 2007), with A = 1 plain SFT on the samples.

    logprobs (grad), old_logprobs, advantages, mask, behaviour_logprobs, is_weights: (B, T) -> (scalar, stats).
    clip_low, clip_high are not read; clip_fraction is 0.
    """
    _only_ppo_has_dual_clip("nll", dual_clip)
    m = mask.bool()
    weight = _loss_weights(old_logprobs, mask, behaviour_logprobs, tis_cap, is_weights)
    loss_mat = -advantages * torch.where(m, logprobs, 0.0) * weight
    stats = _stats(logprobs.new_zeros(()), logprobs, old_logprobs, mask, weight)
    return aggregate_loss(loss_mat, mask, agg_mode, loss_norm_constant), stats


# ---------------------------------------------------------------------------- value loss and diagnostics


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float | None = None,
    agg_mode: str = "token-mean", loss_norm_constant: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) (PPO2 baselines,
    Dhariwal et al. 2017; see Engstrom et al. 2020 on its effect).

    values (grad), old_values, returns, mask: (B, T) -> (loss scalar, clip fraction scalar).
    """
    sq = (values - returns) ** 2
    if clip is None:
        return aggregate_loss(0.5 * sq, mask, agg_mode, loss_norm_constant), values.new_zeros(())
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    sq_clipped = (v_clipped - returns) ** 2
    frac = masked_mean((sq_clipped > sq).float(), mask).detach()
    return aggregate_loss(0.5 * torch.maximum(sq, sq_clipped), mask, agg_mode, loss_norm_constant), frac


def entropy_bonus(logits: Tensor, mask: Tensor, agg_mode: str = "token-mean") -> Tensor:
    """Aggregated policy entropy (Williams & Peng 1991; Mnih et al. 2016); subtract coef * this.

    logits: (B, T, V); mask: (B, T) -> scalar.
    """
    return aggregate_loss(entropy_from_logits(logits), mask, agg_mode)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, all_sum: AllSum | None = None) -> Tensor:
    """1 - Var[R - V] / Var[R] over response tokens (1 = perfect critic, <= 0 = useless).

    values, returns, mask: (B, T) -> detached scalar.
    """
    var_r = masked_var(returns, mask, all_sum=all_sum)
    return (1.0 - masked_var(returns - values, mask, all_sum=all_sum) / (var_r + 1e-8)).detach()


# ---------------------------------------------------------------------------- offline objectives


def bradley_terry_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> Tensor:
    """Reward-model pairwise loss -log sigmoid(r_c - r_r - margin), mean over pairs
    (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1; margin as in Llama 2, Touvron et al. 2023).

    chosen_rewards, rejected_rewards: (B,); margin: (B,) or float -> scalar.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs with r_c > r_r. (B,), (B,) -> detached scalar."""
    return (chosen_rewards > rejected_rewards).float().mean().detach()


def sequence_logprobs(token_logprobs: Tensor, mask: Tensor, length_normalize: bool = False) -> Tensor:
    """log pi(y | x) = SUM of response-token log-probs (what DPO uses); length_normalize=True
    gives the per-token mean instead (SimPO-style, Meng et al. 2024), a named option only.

    token_logprobs: (B, T); mask: (B, T) -> (B,).
    """
    if length_normalize:
        return masked_mean(token_logprobs, mask, dim=-1)
    return masked_sum(token_logprobs, mask, dim=-1)


def _dpo_sigmoid(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def _ipo(h: Tensor, beta: float, label_smoothing: float) -> Tensor:
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[Tensor, float, float], Tensor]] = {"sigmoid": _dpo_sigmoid, "ipo": _ipo}


def dpo_loss(
    policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
    *, beta: float = 0.1, label_smoothing: float = 0.0, loss_type: str = "sigmoid",
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation; all inputs are sequence log-probs (B,) (see sequence_logprobs).

    h = (log pi_c - log ref_c) - (log pi_r - log ref_r).
    "sigmoid": -(1-eps) logsig(beta h) - eps logsig(-beta h) (Rafailov et al. 2023, arXiv:2305.18290;
    conservative DPO label smoothing, Mitchell 2023). "ipo": (h - 1/(2 beta))^2 (Azar et al. 2023,
    arXiv:2310.12036). Returns (loss scalar, chosen_rewards (B,), rejected_rewards (B,)), rewards
    = beta * log-ratio, detached.
    """
    fn = lookup(DPO_LOSSES, loss_type, "DPO loss type")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    loss = fn(chosen_ratio - rejected_ratio, beta, label_smoothing).mean()
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def rwr_weights(rewards: Tensor, beta: float = 1.0, top_fraction: float | None = None) -> Tensor:
    """Reward-weighted regression weights (Peters & Schaal 2007): exp(z / beta), z = rewards whitened
    across the batch, zero outside the top `top_fraction` of rewards, normalised to mean 1.

    rewards: (B,) -> detached (B,). Multiply per-sequence SFT losses by these.
    """
    r = rewards.detach() if rewards.is_floating_point() else rewards.float()
    z = (r - r.mean()) / (r.std() + 1e-8) if r.numel() > 1 else torch.zeros_like(r)
    logits = z / beta
    if top_fraction is not None:
        k = max(1, math.ceil(top_fraction * r.numel()))
        keep = torch.zeros_like(r, dtype=torch.bool)
        keep[torch.topk(r, k).indices] = True
        logits = torch.where(keep, logits, -math.inf)
    w = torch.softmax(logits, dim=0)  # exp(z / beta) / sum, overflow-safe
    return w * r.numel()
