"""Held-out evaluation of a policy against its reference, and a reward-hacking monitor.

Numbers (``eval/...`` keys, registered in ``cluster/metrics.py``), on held-out prompts:

- ``eval/task_score``: the task's true score (the rule, exact match) of greedy responses.
- ``eval/reward_mean``: mean reward-service score of greedy responses (the learned RM when the
  reward is a ``kind: model`` source, as in ``relay pipeline``).
- ``eval/win_rate_vs_reference``: fraction of prompts where the reward service scores the policy's
  greedy response above the reference's; ties count half.
- ``eval/kl_to_reference``: mean per-token k3 estimate of KL(policy || reference) over responses
  *sampled* from the policy: with r = log ref(y_t) - log pi(y_t), k3 = exp(r) - 1 - r (Schulman,
  http://joschu.net/blog/kl-approx.html). k3 is unbiased, non-negative per token and has far lower
  variance than k1 = -r; k1 is logged beside it as ``eval/kl_k1_to_reference`` as a check.
- ``eval/response_length_tokens``: mean greedy response length; ``eval/distinct_1``/``_2``: distinct
  n-grams / all n-grams over all greedy responses (token ids), a corpus-level diversity measure.

Simplifications, on purpose:
- The reference's greedy responses are computed once (they never change) and cached.
- KL is estimated from the sampler's (vLLM) logprobs of the policy and the reference's logprobs
  from a transformers forward pass in the evaluating process: cheap for the embedded model; a large
  model would score on the learner's reference instead. Samples come at the generation temperature;
  the estimate is of the untempered distributions, exact when ``generation.temperature`` is 1.
- The reward-hacking monitor compares the last evaluations with the best earlier ones: a heuristic
  alarm, not a test of significance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.tasks import is_correct

# ---------------------------------------------------------------------------------------- pure numbers


def distinct_n(responses: Sequence[Sequence[int | str]], n: int) -> float:
    """Distinct n-grams / total n-grams over all ``responses`` (each a token sequence); 0 if there are none."""
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> float:
    """Fraction of pairs where the policy scores higher; a tie counts half."""
    if len(policy_scores) != len(reference_scores) or not policy_scores:
        raise ValueError(f"win_rate needs two equal non-empty lists, got {len(policy_scores)} and "
                         f"{len(reference_scores)}")
    wins = sum(1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy_scores, reference_scores, strict=True))
    return wins / len(policy_scores)


def token_kl(policy_logprobs: Sequence[Sequence[float]], reference_logprobs: Sequence[Sequence[float]],
             kind: str = "k3") -> float:
    """Mean per-token KL(policy || reference) estimate over sampled responses (k1 or k3; see the module doc).

    Each inner list holds one response's per-token logprobs, ``(R_i,)``, under the policy and the reference.
    """
    if kind not in ("k1", "k3"):
        raise ValueError(f"token_kl kind must be 'k1' or 'k3', got {kind!r}")
    total, count = 0.0, 0
    for lp, ref in zip(policy_logprobs, reference_logprobs, strict=True):
        if len(lp) != len(ref):
            raise ValueError(f"a response has {len(lp)} policy logprobs but {len(ref)} reference logprobs")
        for a, b in zip(lp, ref, strict=True):
            r = b - a
            total += -r if kind == "k1" else math.exp(r) - 1.0 - r
            count += 1
    return total / count if count else 0.0


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class EvalSamples:
    """Everything one evaluation measured, per held-out prompt (P prompts, S sampled responses)."""

    answers: list[str]  # (P,) reference answers of the task
    responses: list[str]  # (P,) the policy's greedy responses
    response_ids: list[list[int]]  # (P, R_i) their token ids
    rewards: list[float]  # (P,) reward-service scores of the policy's greedy responses
    reference_rewards: list[float]  # (P,) reward-service scores of the reference's greedy responses
    sample_logprobs: list[list[float]] = field(default_factory=list)  # (S, R_j) policy logprobs of samples
    sample_reference_logprobs: list[list[float]] = field(default_factory=list)  # (S, R_j) reference logprobs


def evaluation_metrics(s: EvalSamples) -> dict[str, float]:
    """The ``eval/...`` numbers of one evaluation (pure)."""
    out = {
        "eval/task_score": _mean([float(is_correct(r, a)) for r, a in zip(s.responses, s.answers, strict=True)]),
        "eval/reward_mean": _mean(s.rewards),
        "eval/reference_reward_mean": _mean(s.reference_rewards),
        "eval/win_rate_vs_reference": win_rate(s.rewards, s.reference_rewards),
        "eval/response_length_tokens": _mean([float(len(ids)) for ids in s.response_ids]),
        "eval/distinct_1": distinct_n(s.response_ids, 1),
        "eval/distinct_2": distinct_n(s.response_ids, 2),
    }
    if s.sample_logprobs:
        out["eval/kl_to_reference"] = token_kl(s.sample_logprobs, s.sample_reference_logprobs, "k3")
        out["eval/kl_k1_to_reference"] = token_kl(s.sample_logprobs, s.sample_reference_logprobs, "k1")
    return out


# ------------------------------------------------------------------------------- reward-hacking monitor


@dataclass(frozen=True)
class HackingThresholds:
    """When the monitor raises a flag (all compare the last ``window`` evaluations with earlier ones)."""

    window: int = 3
    """evaluations in the recent window"""
    reward_rise: float = 0.05
    """the RM score counts as rising when the window's mean exceeds the earlier best by this much"""
    true_tolerance: float = 0.01
    """the true score stalls when the window's mean is at most the earlier best + this"""
    length_drift: float = 0.5
    """relative change of the mean response length against the first evaluation that flags a drift"""
    distinct_drop: float = 0.3
    """relative fall of distinct-2 against the first evaluation that flags repetition"""


def reward_hacking_flags(history: Sequence[dict[str, float]], th: HackingThresholds = HackingThresholds()) -> list[str]:
    """Reasons to suspect reward hacking in a sequence of evaluations (oldest first); empty = none.

    Flags: the RM score (``eval/reward_mean``) keeps rising over the last ``window`` evaluations while
    the true score (``eval/task_score``) stalls or falls; the mean response length drifts; distinct-2
    falls (repetition). Needs at least ``window + 1`` evaluations.
    """
    if len(history) < th.window + 1:
        return []
    flags = []
    recent, earlier = history[-th.window:], history[:-th.window]
    rm = [h["eval/reward_mean"] for h in recent]
    true = [h["eval/task_score"] for h in recent]
    rising = all(b >= a for a, b in zip(rm, rm[1:], strict=False)) and \
        _mean(rm) > max(h["eval/reward_mean"] for h in earlier) + th.reward_rise
    if rising and _mean(true) <= max(h["eval/task_score"] for h in earlier) + th.true_tolerance:
        flags.append(f"RM score rising ({rm[0]:.3f} -> {rm[-1]:.3f}) while the true score stalls "
                     f"({_mean(true):.3f} vs best earlier {max(h['eval/task_score'] for h in earlier):.3f})")
    first = history[0]
    for key, limit, what in (("eval/response_length_tokens", th.length_drift, "response length drifted"),):
        base, now = first.get(key), _mean([h.get(key, 0.0) for h in recent])
        if base and abs(now - base) / base > limit:
            flags.append(f"{what}: {base:.2f} -> {now:.2f} tokens")
    base, now = first.get("eval/distinct_2"), _mean([h.get("eval/distinct_2", 0.0) for h in recent])
    if base and (base - now) / base > th.distinct_drop:
        flags.append(f"repetition: distinct-2 fell {base:.3f} -> {now:.3f}")
    return flags


# ---------------------------------------------------------------------------------------- the evaluator

Responses = tuple[list[str], list[list[int]]]  # texts (P,), token ids (P, R_i)


@dataclass
class Evaluator:
    """Runs evaluations through injected functions, so the driver (Ray actors) and ``relay eval``
    (transformers in-process) share the numbers. Keeps the reference's cached responses and the history.

    - ``policy_greedy(prompts) -> (texts, ids)``; ``reference_greedy`` likewise (called once).
    - ``score(prompts, responses, answers) -> rewards`` (the reward service or an RM).
    - ``sample(prompts) -> (prompt_ids, response_ids, policy_logprobs)`` lists, one entry per sample; optional.
    - ``reference_logprobs(prompt_ids, response_ids) -> logprobs`` per sample; needed with ``sample``.
    """

    prompts: list[str]
    answers: list[str]
    policy_greedy: Callable[[list[str]], Responses]
    reference_greedy: Callable[[list[str]], Responses]
    score: Callable[[list[str], list[str], list[str]], list[float]]
    sample: Callable[[list[str]], tuple[list[list[int]], list[list[int]], list[list[float]]]] | None = None
    reference_logprobs: Callable[[list[list[int]], list[list[int]]], list[list[float]]] | None = None
    thresholds: HackingThresholds = field(default_factory=HackingThresholds)
    history: list[dict[str, float]] = field(default_factory=list)
    _reference_rewards: list[float] | None = None

    def __call__(self, log: Callable[[str], object] = print) -> dict[str, float]:
        texts, ids = self.policy_greedy(self.prompts)
        rewards = self.score(self.prompts, texts, self.answers)
        if self._reference_rewards is None:
            ref_texts, _ = self.reference_greedy(self.prompts)
            self._reference_rewards = self.score(self.prompts, ref_texts, self.answers)
        samples = EvalSamples(self.answers, texts, ids, rewards, self._reference_rewards)
        if self.sample is not None and self.reference_logprobs is not None:
            prompt_ids, response_ids, logprobs = self.sample(self.prompts)
            samples.sample_logprobs = logprobs
            samples.sample_reference_logprobs = self.reference_logprobs(prompt_ids, response_ids)
        metrics = evaluation_metrics(samples)
        self.history.append(metrics)
        flags = reward_hacking_flags(self.history, self.thresholds)
        metrics["eval/reward_hacking_flag"] = float(bool(flags))
        for flag in flags:
            log(f"reward-hacking monitor: {flag}")
        return metrics


# ------------------------------------------------------------------------ transformers-side helpers


def reference_logprob_fn(model) -> Callable[[list[list[int]], list[list[int]]], list[list[float]]]:
    """``(prompt_ids, response_ids) -> per-token logprobs of each response`` under a HF causal LM."""
    import torch

    from learner.algos import gather_logprobs

    @torch.no_grad()
    def fn(prompt_ids: list[list[int]], response_ids: list[list[int]], batch_size: int = 256) -> list[list[float]]:
        out: list[list[float]] = []
        for i in range(0, len(prompt_ids), batch_size):
            rows = [p + r for p, r in zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size], strict=True)]
            width = max(len(x) for x in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            attn = torch.zeros((len(rows), width), dtype=torch.long)
            for j, x in enumerate(rows):
                ids[j, :len(x)] = torch.tensor(x)
                attn[j, :len(x)] = 1
            logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()  # (B, T-1, V)
            lp = gather_logprobs(logits, ids[:, 1:])  # (B, T-1)
            for j, (p, r) in enumerate(zip(prompt_ids[i:i + batch_size], response_ids[i:i + batch_size],
                                           strict=True)):
                out.append(lp[j, len(p) - 1:len(p) - 1 + len(r)].tolist())
        return out

    return fn


def hf_greedy_fn(model, tokenizer, max_tokens: int) -> Callable[[list[str]], Responses]:
    """Greedy responses with transformers (``relay eval`` without Ray)."""
    from learner.sft import greedy_responses

    def fn(prompts: list[str]) -> Responses:
        texts = greedy_responses(model, tokenizer, prompts, max_tokens)
        return texts, [tokenizer.encode(t, add_special_tokens=False) for t in texts]

    return fn


def hf_sample_fn(model, tokenizer, max_tokens: int, temperature: float, seed: int = 0):
    """One sampled response per prompt with transformers, and the policy's logprobs of it."""
    import torch

    policy_logprobs = reference_logprob_fn(model)

    @torch.no_grad()
    def fn(prompts: list[str]) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
        torch.manual_seed(seed)
        eos = tokenizer.eos_token_id
        prompt_ids, response_ids = [], []
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
            resp = gen[0, ids.shape[1]:].tolist()
            if eos in resp:
                resp = resp[:resp.index(eos) + 1]
            prompt_ids.append(ids[0].tolist())
            response_ids.append(resp)
        return prompt_ids, response_ids, policy_logprobs(prompt_ids, response_ids)

    return fn


# ------------------------------------------------------------------------------------ driver wiring

KL_PROMPTS = 64
"""held-out prompts whose sampled responses (``generation.samples_per_prompt`` each) estimate the KL"""


def driver_evaluator(driver) -> Evaluator:
    """An Evaluator over the driver's generation actors and reward service.

    The first evaluation runs at step 0, before any update, when the policy is the reference
    (the learner's reference is the starting checkpoint): its greedy responses are the reference's.
    """
    from transformers import AutoModelForCausalLM

    from reward_service.records import RewardRequest

    prompts = {p.text: p for p in driver.eval_prompts}

    def greedy(texts: list[str]) -> Responses:
        shards = driver._shards([prompts[t] for t in texts])
        by_text = {p.text: r for i, s in enumerate(shards) for p, r in zip(s, driver._on_actor(i, "greedy", s),
                                                                            strict=True)}
        out = [by_text[t] for t in texts]
        return out, [driver.tokenizer.encode(t, add_special_tokens=False) for t in out]

    def score(texts: list[str], responses: list[str], answers: list[str]) -> list[float]:
        results = driver.reward.score([RewardRequest(p, r, {"answer": a})
                                       for p, r, a in zip(texts, responses, answers, strict=True)])
        return [0.0 if res.reward is None else res.reward for res in results]  # excluded samples score 0

    def sample(texts: list[str]):
        shards = driver._shards([prompts[t] for t in texts[:KL_PROMPTS]])
        rollouts = [r for i, s in enumerate(shards) for r in driver._on_actor(i, "generate", s)[0]]
        return ([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                [r.sampling_logprobs for r in rollouts])

    reference = AutoModelForCausalLM.from_pretrained(driver.policy_path).eval()
    return Evaluator(
        prompts=list(prompts), answers=[p.metadata["answer"] for p in driver.eval_prompts],
        policy_greedy=greedy, reference_greedy=greedy, score=score, sample=sample,
        reference_logprobs=reference_logprob_fn(reference),
    )


# ---------------------------------------------------------------------------------------- relay eval


def evaluate_checkpoints(cfg, policy: str, reference: str, rm: str | None = None,
                         log: Callable[[str], object] = print) -> dict[str, float]:
    """``relay eval``: one evaluation of ``policy`` against ``reference`` in this process (no Ray).

    Scores with the reward model at ``rm`` (a ``learner/rm_trainer.py`` checkpoint), or, without one,
    with the task's rule (exact match, so RM score = true score). Held-out prompts are the driver's:
    the first ``train.eval_prompts`` of ``make_problems(task...)``; one sampled response per prompt
    estimates the KL.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer


    t, g = cfg.task, cfg.generation
    _, held_out = t.problems()
    held_out = held_out[: cfg.train.eval_prompts]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    pol = AutoModelForCausalLM.from_pretrained(policy).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    if rm is not None:
        from reward_service.models import RewardModel, join_text

        reward_model = RewardModel.from_pretrained(rm).eval()

        def score(prompts: list[str], responses: list[str], answers: list[str]) -> list[float]:
            with torch.inference_mode():
                return reward_model.score([join_text(p, r) for p, r in zip(prompts, responses, strict=True)])[0]
    else:
        def score(prompts: list[str], responses: list[str], answers: list[str]) -> list[float]:
            return [float(is_correct(r, a)) for r, a in zip(responses, answers, strict=True)]

    evaluator = Evaluator(
        prompts=[p.prompt for p in held_out], answers=[p.answer for p in held_out],
        policy_greedy=hf_greedy_fn(pol, tokenizer, g.max_tokens), reference_greedy=hf_greedy_fn(ref, tokenizer,
                                                                                                g.max_tokens),
        score=score, sample=hf_sample_fn(pol, tokenizer, g.max_tokens, g.temperature, seed=g.seed),
        reference_logprobs=reference_logprob_fn(ref),
    )
    return evaluator(log=log)
