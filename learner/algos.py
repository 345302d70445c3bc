"""The algorithm core of Relay: advantages, KL, policy/value losses and offline objectives.

Pure tensor-in, tensor-out functions (torch and stdlib only) so that every trainer
(learner actor, offline trainers, tests) calls the same math. Shapes: B = batch of
sequences, T = response positions, V = vocabulary.

Conventions and simplifications (deliberate):
- Masks are `(B, T)`, bool or float, binary: nonzero = real response token. Masked-out
  positions are selected away with `torch.where`, so whatever they hold (large garbage,
  but not NaN for gradients) never reaches a result or a gradient.
- Per-token log-probabilities are those of the SAMPLED token; every ratio is per token.
- Outcome-reward estimators (GRPO, Dr.GRPO, RLOO) use the sum of a sequence's token rewards
  as its outcome reward and give every response token of the sequence the same advantage;
  their `returns` are that outcome reward broadcast over the response tokens.
- GAE and returns-to-go skip masked positions inside a sequence (they carry the next real
  token's value through them) and bootstrap 0 after the last real token: a response is
  assumed to end the episode (no truncation bootstrap).
- GAE advantages are not whitened here; a trainer that wants it calls `masked_whiten`.
- Group statistics use the unbiased std (as `torch.std`); a singleton group gets advantage 0.
- "seq-mean-*" aggregation averages over sequences that have at least one response token.
- No distributed reductions: a trainer with data parallelism reduces across ranks itself. "Global"
  normalisation (reinforce, REINFORCE++) is over the batch the function is given.
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

Tensor = torch.Tensor


def _names(table: dict) -> str:
    return ", ".join(sorted(table))


def _registrar(table: dict, name: str, what: str) -> Callable:
    """A decorator that puts its function into ``table`` under ``name`` (once)."""

    def register(fn):
        if name in table:
            raise ValueError(f"{what} {name!r} registered twice")
        table[name] = fn
        return fn

    return register


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; valid: {_names(table)}")
    return table[name]


# ---------------------------------------------------------------------------- masked helpers


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` over positions where `mask` is nonzero.

    x: (B, T) (any shape); mask: same shape as x (or broadcastable). dim=None sums all.
    """
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


AllSum = Callable[[Tensor], Tensor]
"""Sums a tensor over the ranks of a learner group (``learner/distributed.py``); None = one process."""


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, all_sum: AllSum | None = None) -> Tensor:
    """Mean of `x` over masked positions; 0 where there are none.

    x: (B, T); mask: (B, T). dim=None -> scalar; dim=-1 -> (B,); dim=0 -> (T,). With `all_sum` the sum and
    the count are summed over the ranks first (dim None or 0 only: the mean of the whole, split, batch).
    """
    count, total = masked_sum(torch.ones_like(x), mask, dim), masked_sum(x, mask, dim)
    if all_sum is not None:
        count, total = all_sum(count), all_sum(total)
    return total / count.clamp_min(1.0)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True, all_sum: AllSum | None = None) -> Tensor:
    """Variance of `x` over all masked positions (scalar); unbiased uses n-1 (n >= 2). Two passes (mean, then
    squared deviations), also across ranks with `all_sum`.

    x: (B, T); mask: (B, T).
    """
    mean = masked_mean(x, mask, all_sum=all_sum)
    var = masked_mean((x - mean) ** 2, mask, all_sum=all_sum)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        n = n if all_sum is None else all_sum(n)
        var = var * n / (n - 1).clamp_min(1.0)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_sum: AllSum | None = None) -> Tensor:
    """(x - mean) / std over masked positions of the whole batch (all ranks' with `all_sum`); padding set to 0.

    x: (B, T); mask: (B, T) -> (B, T). shift_mean=False adds the mean back (scale only).
    """
    mean, var = masked_mean(x, mask, all_sum=all_sum), masked_var(x, mask, all_sum=all_sum)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros_like(out))


# ---------------------------------------------------------------------------- logits


def gather_logprobs(logits: Tensor, ids: Tensor) -> Tensor:
    """log softmax(logits)[ids]: log-probability of each sampled token.

    logits: (B, T, V); ids: (B, T) long -> (B, T) float32.
    Uses logit - logsumexp (no saved (B, T, V) log_softmax); half precision is upcast row by row.
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        rows = [gather_logprobs(row.float().unsqueeze(0), i.unsqueeze(0)) for row, i in zip(logits, ids, strict=True)]
        return torch.cat(rows)
    picked = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def mask_early_stop(logits: Tensor, response_mask: Tensor, stop_ids: list[int], min_tokens: int) -> Tensor:
    """The sampler's ``min_tokens`` (vLLM's min-tokens logits processor): a stop token cannot be sampled while
    fewer than ``min_tokens`` response tokens are out, so its logit is removed there and the sampled token's
    probability is renormalised over the rest, as the sampler's logprobs are.

    logits: (B, T, V), position t predicting token t + 1; response_mask: (B, T), 1 where that token is a
    response token. Modified in place (and returned). The lowest finite value, not -inf, keeps the entropy's
    p * log p at 0 rather than NaN."""
    early = (response_mask > 0) & (response_mask.cumsum(-1) <= min_tokens)  # response tokens 1..min_tokens
    if early.any():
        logits[..., stop_ids] = logits[..., stop_ids].masked_fill(early.unsqueeze(-1), torch.finfo(logits.dtype).min)
    return logits


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits) at each position.

    logits: (B, T, V) -> (B, T). H = logsumexp(z) - sum_v softmax(z)_v z_v.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


# ---------------------------------------------------------------------------- sequences and groups


def sequence_rewards(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """Outcome reward per sequence = sum of its response-token rewards.

    token_rewards: (B, T); mask: (B, T) -> (B,).
    """
    return masked_sum(token_rewards, mask, dim=-1)


def place_reward_on_last_token(seq_rewards: Tensor, mask: Tensor) -> Tensor:
    """Put each sequence's scalar reward on its last response token (last nonzero of mask).

    seq_rewards: (B,); mask: (B, T) -> (B, T), zero elsewhere; rows without tokens stay 0.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    last = torch.where(mask.bool(), positions, -1).max(dim=-1).values  # (B,)
    onehot = positions == last.unsqueeze(-1)  # (B, T); all False for empty rows
    rewards = seq_rewards if seq_rewards.is_floating_point() else seq_rewards.float()
    return torch.where(onehot, rewards.unsqueeze(-1), 0.0)


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mean, unbiased std and size of each element's group, broadcast back to the elements.

    values: (B,) float; group_ids: (B,) long (any labels) -> three (B,) tensors.
    A singleton group has std 0.
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    zeros = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, inverse, torch.ones_like(values))
    mean = zeros.index_add(0, inverse, values) / count
    sq_dev = (values - mean[inverse]) ** 2
    var = zeros.index_add(0, inverse, sq_dev) / (count - 1).clamp_min(1.0)
    return mean[inverse], var.sqrt()[inverse], count[inverse]


def uniform_group_mask(rewards: Tensor, group_ids: Tensor, atol: float = 0.0) -> Tensor:
    """True for elements whose group's rewards are all equal (within atol): no learning signal.

    rewards: (B,); group_ids: (B,) long -> bool (B,). Singleton groups count as uniform.
    Used by GRPO trainers to drop such groups from the update (DAPO's dynamic sampling filter).
    """
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    base = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device)
    high = base.scatter_reduce(0, inverse, rewards, reduce="amax", include_self=False)
    low = base.scatter_reduce(0, inverse, rewards, reduce="amin", include_self=False)
    return (high - low)[inverse] <= atol


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Returns-to-go G_t = sum_{k >= t} gamma^(k-t) r_k over response tokens (masked ones skipped).

    token_rewards: (B, T); mask: (B, T) -> (B, T), zero on padding. Sutton & Barto (2018) eq. 3.8.
    """
    m = mask.bool()
    out = torch.zeros_like(token_rewards)
    running = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        step = token_rewards[:, t] + gamma * running
        running = torch.where(m[:, t], step, running)
        out[:, t] = torch.where(m[:, t], step, 0.0)
    return out


# ---------------------------------------------------------------------------- advantage estimators

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
BATCH_WIDE = ("reinforce", "reinforce_pp", "reinforce_pp_baseline", "rwr")
"""estimators whose statistics span the whole batch (they take `all_sum`); the others are per group"""


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: register an advantage estimator under `name` in ADVANTAGE_ESTIMATORS.

    Every estimator takes the keyword-only arguments
    token_rewards (B, T), mask (B, T), group_ids (B,) long, values (B, T) or None, gamma, lam
    and returns (advantages (B, T), returns (B, T)), both zero on padding.
    """

    return _registrar(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator registered as `name`; ValueError listing valid names otherwise."""
    return _lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    """(B,) -> (B, T): value on every response token, 0 on padding."""
    return torch.where(mask.bool(), per_seq.unsqueeze(-1), 0.0)


@register_advantage("gae")
def gae_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16).

    token_rewards: (B, T); mask: (B, T); values: (B, T) required -> (advantages, returns), (B, T) each.
    delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}; V and A are 0 after
    the last response token (padding values/rewards ignored). returns = A + V.
    """
    if values is None:
        raise ValueError("gae needs values (a critic); use grpo/drgrpo/rloo/reinforce without one")
    m = mask.bool()
    adv = torch.zeros_like(token_rewards)
    next_value = next_adv = torch.zeros_like(token_rewards[:, 0])
    for t in reversed(range(token_rewards.shape[1])):
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a_t = delta + gamma * lam * next_adv
        next_value = torch.where(m[:, t], values[:, t], next_value)
        next_adv = torch.where(m[:, t], a_t, next_adv)
        adv[:, t] = torch.where(m[:, t], a_t, 0.0)
    returns = torch.where(m, adv + values, 0.0)
    return adv, returns


REWARD_BASELINES = ("none", "batch", "group")


def baseline_rewards(rewards: Tensor, group_ids: Tensor, mode: str = "none", all_sum: AllSum | None = None) -> Tensor:
    """Sequence rewards with a baseline taken off before KL shaping, the critic and GAE see them.

    rewards, group_ids: (B,) -> (B,).
    - ``none``: unchanged.
    - ``batch``: whitened over the whole batch (all ranks' with ``all_sum``): the per-batch normalisation of a
      learned reward's score.
    - ``group``: minus the mean of the *other* samples of the same prompt, the leave-one-out baseline of RLOO
      (Kool et al. 2019; Ahmadian et al. 2024). With several samples per prompt the prompt's difficulty leaves the
      reward, so the critic only has to learn what differs within a group; a baseline that does not depend on the
      sample leaves the policy gradient unbiased. Singleton groups are unchanged.
    """
    if mode == "none":
        return rewards
    if mode == "batch":
        ones = torch.ones_like(rewards)
        return masked_whiten(rewards[None], ones[None], all_sum=all_sum)[0]
    if mode == "group":
        _, uniq = torch.unique(group_ids, return_inverse=True)
        sums = torch.zeros(int(uniq.max()) + 1, dtype=rewards.dtype, device=rewards.device).index_add_(0, uniq, rewards)
        count = torch.bincount(uniq).to(rewards.dtype)[uniq]
        others = (sums[uniq] - rewards) / (count - 1).clamp_min(1.0)
        return torch.where(count > 1, rewards - others, rewards)
    raise ValueError(f"unknown reward baseline {mode!r}; choose one of {', '.join(REWARD_BASELINES)}")


def _group_outcome(token_rewards: Tensor, mask: Tensor, group_ids: Tensor) -> tuple[Tensor, ...]:
    r = sequence_rewards(token_rewards, mask)
    mean, std, count = group_stats(r, group_ids)
    return r, mean, std, count


@register_advantage("grpo")
def grpo_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """GRPO outcome advantage (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1.2).

    token_rewards: (B, T); mask: (B, T); group_ids: (B,) -> (advantages, returns), (B, T) each.
    A_i = (r_i - mean_group) / (std_group + eps) on every response token; singleton groups -> 0.
    values, gamma, lam are ignored.
    """
    r, mean, std, count = _group_outcome(token_rewards, mask, group_ids)
    adv = torch.where(count > 1, (r - mean) / (std + eps), 0.0)
    return _broadcast(adv, mask), _broadcast(r, mask)


@register_advantage("drgrpo")
def drgrpo_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Dr.GRPO advantage (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783).

    token_rewards: (B, T); mask: (B, T); group_ids: (B,) -> (advantages, returns), (B, T) each.
    A_i = r_i - mean_group (no std division, which biases towards easy/hard questions).
    Pair with agg_mode "seq-mean-token-sum-norm" to also remove the length bias.
    """
    r, mean, _, _ = _group_outcome(token_rewards, mask, group_ids)
    return _broadcast(r - mean, mask), _broadcast(r, mask)


@register_advantage("rloo")
def rloo_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, arXiv:2402.14740).

    token_rewards: (B, T); mask: (B, T); group_ids: (B,) -> (advantages, returns), (B, T) each.
    A_i = r_i - mean_{j != i in group} r_j = n/(n-1) (r_i - mean_group); singleton groups -> 0.
    """
    r, mean, _, count = _group_outcome(token_rewards, mask, group_ids)
    adv = torch.where(count > 1, (r - mean) * count / (count - 1).clamp_min(1.0), 0.0)
    return _broadcast(adv, mask), _broadcast(r, mask)


@register_advantage("reinforce")
def reinforce_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0, normalize: bool = True, all_sum: AllSum | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE with baseline (Williams 1992): A_t = G_t - b_t, whitened across the whole batch.

    token_rewards: (B, T); mask: (B, T); values: (B, T) or None -> (advantages, returns = G), (B, T).
    G_t = discounted returns-to-go. b_t = values if given, else the mean of G at position t over
    the sequences that have a token there. Normalisation is over all tokens of the BATCH, never
    within one trajectory (that would zero a single-step episode's advantage). lam is ignored.
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    if values is None:
        baseline = masked_mean(returns, mask, dim=0, all_sum=all_sum).unsqueeze(0)  # (1, T): mean over sequences at t
    else:
        baseline = values
    adv = torch.where(mask.bool(), returns - baseline, 0.0)
    if normalize:
        adv = masked_whiten(adv, mask, all_sum=all_sum)
    return adv, returns


@register_advantage("reinforce_pp")
def reinforce_pp_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0, all_sum: AllSum | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu et al. 2025, arXiv:2501.03262; OpenRLHF's "reinforce" estimator).

    token_rewards: (B, T); mask: (B, T) -> (advantages, returns = G), (B, T) each.
    token_rewards carry the KL penalty per token and the outcome reward on the last token (what
    `token_rewards_with_kl` builds): G_t = sum_{k >= t} gamma^(k-t) r_k = r gamma^(L-1-t) - beta sum_{k>=t} KL_k.
    A = (G - mean) / std over every response token of the batch (no per-group or per-position baseline).
    Global normalisation means the batch GIVEN: call it once on the whole step, not per micro-batch or rank.
    std is the unbiased one of `masked_whiten` (OpenRLHF divides by n, not n - 1). group_ids, values, lam ignored.
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    return masked_whiten(returns, mask, all_sum=all_sum), returns


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0, outcome_rewards: Tensor | None = None, all_sum: AllSum | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with baseline (Hu et al. 2025, arXiv:2501.03262; OpenRLHF's "reinforce_baseline").

    token_rewards: (B, T); mask: (B, T); group_ids: (B,); outcome_rewards: (B,) or None
    -> (advantages, returns = G), (B, T) each.
    A_t = G_t - mean_group(R), then whitened (mean and std) over every response token of the batch.
    OpenRLHF subtracts the group mean from the outcome reward BEFORE it adds the per-token KL and takes
    returns-to-go (with gamma forced to 1), and normalises over the global batch, never per group; here
    the group mean is subtracted from every G_t, which is the same at gamma = 1 and stays a valid
    (action-independent) baseline at gamma < 1. R is `outcome_rewards` when given (OpenRLHF's exact
    baseline when the KL is in the reward), else the sum of token_rewards (the same when it is not; with
    the KL in the reward it also centres each group's mean KL penalty). The paper pairs this variant with
    the KL in the loss (k2). A singleton group's baseline is its own reward (as grpo/drgrpo). values, lam ignored.
    """
    returns = discounted_returns(token_rewards, mask, gamma)
    scored = sequence_rewards(token_rewards, mask) if outcome_rewards is None else outcome_rewards.to(returns.dtype)
    baseline, _, _ = group_stats(scored, group_ids)
    adv = torch.where(mask.bool(), returns - baseline.unsqueeze(-1), 0.0)
    return masked_whiten(adv, mask, all_sum=all_sum), returns


@register_advantage("rwr")
def rwr_advantages(
    *, token_rewards: Tensor, mask: Tensor, group_ids: Tensor | None = None, values: Tensor | None = None,
    gamma: float = 1.0, lam: float = 1.0, beta: float = 1.0, whiten: bool = True, all_sum: AllSum | None = None,
) -> tuple[Tensor, Tensor]:
    """Reward-weighted regression weights (Peters & Schaal 2007) as per-token "advantages" (B, T).

    token_rewards: (B, T); mask: (B, T) -> (weights, returns = R broadcast), (B, T) each. R = the sequence
    reward; z = R whitened over the whole batch (all ranks' with `all_sum`; whiten=False: z = R raw);
    w = exp(z / beta) / mean over the batch of exp(z / beta): non-negative, mean 1. Paired with the "nll"
    policy loss, the update is the weighted log-likelihood of the samples: no ratio, no clip, no baseline.
    The exponent is capped at 50 so a raw reward / small beta cannot overflow. group_ids, values, lam ignored.
    """
    r = sequence_rewards(token_rewards, mask)  # (B,)
    rows = mask.bool().any(-1).to(r.dtype)
    if whiten:
        mean = masked_mean(r, rows, all_sum=all_sum)
        std = masked_var(r, rows, all_sum=all_sum).sqrt()
        z = (r - mean) / (std + 1e-8)
    else:
        z = r
    e = torch.exp((z / beta).clamp(max=50.0)) * rows
    w = e / masked_mean(e, rows, all_sum=all_sum).clamp_min(1e-30)
    return _broadcast(w, mask), _broadcast(r, mask)


# ---------------------------------------------------------------------------- KL


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio**2


def _k3(log_ratio: Tensor) -> Tensor:
    return torch.exp(-log_ratio) + log_ratio - 1.0


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

    logprobs, ref_logprobs: (B, T) -> (B, T). Schulman, "Approximating KL Divergence"
    (http://joschu.net/blog/kl-approx.html), with d = ref - logp:
    k1 = -d (unbiased, high variance), k2 = d^2 / 2, k3 = exp(d) - d - 1 (unbiased, >= 0).
    """
    return _lookup(KL_ESTIMATORS, kind, "KL estimator kind")(logprobs - ref_logprobs)


def token_rewards_with_kl(seq_rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO-RLHF per-token reward: -kl_coef * KL_t on every response token, plus the sequence
    reward on the last response token (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022).

    seq_rewards: (B,); kl: (B, T); mask: (B, T) -> (B, T), zero on padding.
    """
    penalty = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return penalty + place_reward_on_last_token(seq_rewards, mask).to(penalty.dtype)


def kl_loss(
    logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: str = "k3", agg_mode: str = "token-mean",
    loss_norm_constant: float | None = None,
) -> Tensor:
    """KL-in-the-loss term (GRPO, Shao et al. 2024 eq. 4 uses k3), aggregated to a scalar.

    logprobs, ref_logprobs, mask: (B, T) -> scalar. The trainer adds coef * this to the loss.
    """
    return aggregate_loss(kl_estimate(logprobs, ref_logprobs, kind), mask, agg_mode, loss_norm_constant)


class FixedKLController:
    """Constant KL coefficient (Ziegler et al. 2019)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, sec. 2.2):
    e = clip(KL / target - 1, -0.2, 0.2); coef *= 1 + e * n_steps / horizon.
    """

    def __init__(self, init_kl_coef: float, target_kl: float, horizon: float):
        super().__init__(init_kl_coef)
        self.target_kl, self.horizon = float(target_kl), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: the measured mean KL (float); n_steps: samples (or steps) since the last update."""
        error = min(max(float(current_kl) / self.target_kl - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


KL_CONTROLLERS: dict[str, type[FixedKLController]] = {"fixed": FixedKLController, "adaptive": AdaptiveKLController}


def make_kl_controller(kind: str, **kwargs: float) -> FixedKLController:
    """make_kl_controller("fixed", kl_coef=...) or ("adaptive", init_kl_coef=, target_kl=, horizon=)."""
    return _lookup(KL_CONTROLLERS, kind, "KL controller")(**kwargs)


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
    return _lookup(AGG_MODES, mode, "loss aggregation mode")(loss_mat, mask, constant)


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
    weight, keep, corrected = _lookup(ROLLOUT_CORRECTIONS, mode, "rollout correction")(log_ratio, m, cap, low, high)
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

    return _registrar(POLICY_LOSSES, name, "policy loss")


def get_policy_loss(name: str) -> PolicyLossFn:
    """The policy loss registered as `name`; ValueError listing valid names otherwise."""
    return _lookup(POLICY_LOSSES, name, "policy loss")


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
    loss_mat = _broadcast(seq_loss, m) * weight
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
    fn = _lookup(DPO_LOSSES, loss_type, "DPO loss type")
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
