"""The algorithm core of Relay, part one: masked statistics, logits, sequence and group statistics, the
advantage estimators and KL (estimators, per-token KL rewards, controllers). The losses built on them (loss
aggregation, rollout correction, policy, value, KL and offline losses) are in ``learner/losses.py``.

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
- No distributed reductions: a trainer with data parallelism reduces across ranks itself. "Global"
  normalisation (reinforce, REINFORCE++) is over the batch the function is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor


def names(table: dict) -> str:
    return ", ".join(sorted(table))


def registrar(table: dict, name: str, what: str) -> Callable:
    """A decorator that puts its function into ``table`` under ``name`` (once)."""

    def register(fn):
        if name in table:
            raise ValueError(f"{what} {name!r} registered twice")
        table[name] = fn
        return fn

    return register


def lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; valid: {names(table)}")
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

    return registrar(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def get_advantage_estimator(name: str) -> AdvantageFn:
    """The estimator registered as `name`; ValueError listing valid names otherwise."""
    return lookup(ADVANTAGE_ESTIMATORS, name, "advantage estimator")


def broadcast_to_tokens(per_seq: Tensor, mask: Tensor) -> Tensor:
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
    return broadcast_to_tokens(adv, mask), broadcast_to_tokens(r, mask)


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
    return broadcast_to_tokens(r - mean, mask), broadcast_to_tokens(r, mask)


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
    return broadcast_to_tokens(adv, mask), broadcast_to_tokens(r, mask)


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
    return broadcast_to_tokens(w, mask), broadcast_to_tokens(r, mask)


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
    return lookup(KL_ESTIMATORS, kind, "KL estimator kind")(logprobs - ref_logprobs)


def token_rewards_with_kl(seq_rewards: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """PPO-RLHF per-token reward: -kl_coef * KL_t on every response token, plus the sequence
    reward on the last response token (Ziegler et al. 2019, arXiv:1909.08593; Ouyang et al. 2022).

    seq_rewards: (B,); kl: (B, T); mask: (B, T) -> (B, T), zero on padding.
    """
    penalty = torch.where(mask.bool(), -kl_coef * kl, 0.0)
    return penalty + place_reward_on_last_token(seq_rewards, mask).to(penalty.dtype)


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
    return lookup(KL_CONTROLLERS, kind, "KL controller")(**kwargs)
