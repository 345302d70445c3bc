"""Held-out evaluation of a policy against its reference, and a reward-hacking monitor.

Numbers (``eval/...`` keys, registered in ``core/metrics.py``), on held-out prompts:

- ``eval/task_score``: the held-out score: mean of ``train.eval_reward`` (or, without one, the training
  reward) over greedy responses, so it means the same on any task (exact match on the addition task).
- ``eval/pass_at_k``, ``eval/mean_at_k`` (``train.eval_k`` > 0): k responses sampled per prompt and scored
  the same way; pass@k = share of prompts with at least one sample scoring >= ``train.eval_pass_threshold``
  (with n = k samples this is Chen et al. 2021's unbiased estimator), mean@k = the mean score of all samples.
- ``eval/set_task_score{eval_set=NAME}`` (and ``eval/set_pass_at_k``): the same for every named eval set.
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

    true_scores: list[float]  # (P,) held-out score (eval reward) of the policy's greedy responses
    responses: list[str]  # (P,) the policy's greedy responses
    response_ids: list[list[int]]  # (P, R_i) their token ids
    rewards: list[float]  # (P,) reward-service scores of the policy's greedy responses
    reference_rewards: list[float]  # (P,) reward-service scores of the reference's greedy responses
    sample_logprobs: list[list[float]] = field(default_factory=list)  # (S, R_j) policy logprobs of samples
    sample_reference_logprobs: list[list[float]] = field(default_factory=list)  # (S, R_j) reference logprobs


def pass_and_mean_at_k(scores: Sequence[Sequence[float]], threshold: float) -> tuple[float, float]:
    """(pass@k, mean@k) from k scores per prompt, ``(P, k)``: the share of prompts with a score >= ``threshold``,
    and the mean of all scores."""
    if not scores or not all(scores):
        raise ValueError("pass_and_mean_at_k needs at least one prompt with at least one sample")
    passed = _mean([float(any(x >= threshold for x in row)) for row in scores])
    return passed, _mean([x for row in scores for x in row])


def evaluation_metrics(s: EvalSamples) -> dict[str, float]:
    """The ``eval/...`` numbers of one evaluation (pure)."""
    out = {
        "eval/task_score": _mean(s.true_scores),
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
    kl_acceleration: float = 2.0
    """the KL to the reference accelerates when it rises this many times faster per evaluation over the window
    than over the evaluations before it"""
    kl_min_rise: float = 0.02
    """... and by at least this much per evaluation (nats per token), so noise around a flat KL never fires"""
    length_drift: float = 0.5
    """relative change of the mean response length against the first evaluation that flags a drift"""
    distinct_drop: float = 0.3
    """relative fall of distinct-2 against the first evaluation that flags repetition"""


HACKING_SIGNALS = ("rm_vs_true", "kl_acceleration", "length", "repetition")


def reward_hacking_flags(history: Sequence[dict[str, float]], th: HackingThresholds = HackingThresholds(),
                         has_true_score: bool = True) -> dict[str, str]:
    """The signals that suspect reward hacking in a sequence of evaluations (oldest first): {signal: why}, one of
    ``HACKING_SIGNALS`` each; empty = none. Needs at least ``window + 1`` evaluations.

    - ``rm_vs_true``: the RM score (``eval/reward_mean``) keeps rising over the window while the held-out true
      score (``eval/task_score``) stalls or falls. Only with a true score other than the RM (``has_true_score``).
    - ``kl_acceleration``: ``eval/kl_to_reference`` rises at every evaluation of the window, ``kl_acceleration`` times
      faster per evaluation than before it: the policy has found a direction the reward pays for and runs down it.
    - ``length`` / ``repetition``: the mean response length drifts, or distinct-2 falls, against the first evaluation.
    """
    if len(history) < th.window + 1:
        return {}
    flags = {}
    recent, earlier = history[-th.window:], history[:-th.window]
    rm = [h["eval/reward_mean"] for h in recent]
    true = [h["eval/task_score"] for h in recent]
    rising = all(b >= a for a, b in zip(rm, rm[1:], strict=False)) and \
        _mean(rm) > max(h["eval/reward_mean"] for h in earlier) + th.reward_rise
    if has_true_score and rising and _mean(true) <= max(h["eval/task_score"] for h in earlier) + th.true_tolerance:
        flags["rm_vs_true"] = (f"RM score rising ({rm[0]:.3f} -> {rm[-1]:.3f}) while the true score stalls "
                               f"({_mean(true):.3f} vs best earlier {max(h['eval/task_score'] for h in earlier):.3f})")
    kl = [h.get("eval/kl_to_reference") for h in history]
    if all(k is not None for k in kl):
        before = (kl[-th.window] - kl[0]) / max(len(kl) - th.window, 1)  # per evaluation, up to the window
        during = (kl[-1] - kl[-th.window]) / (th.window - 1) if th.window > 1 else 0.0
        window = kl[-th.window:]
        rising = all(b > a for a, b in zip(window, window[1:], strict=False))  # one noisy estimate is not a trend
        if rising and during > th.kl_min_rise and during > th.kl_acceleration * max(before, 0.0):
            flags["kl_acceleration"] = (f"KL to the reference accelerating: +{during:.3f} per evaluation over the "
                                        f"last {th.window} ({kl[-th.window]:.3f} -> {kl[-1]:.3f}) against "
                                        f"{before:+.3f} before")
    first = history[0]
    base, now = first.get("eval/response_length_tokens"), _mean([h.get("eval/response_length_tokens", 0.0)
                                                                for h in recent])
    if base and abs(now - base) / base > th.length_drift:
        flags["length"] = f"response length drifted: {base:.2f} -> {now:.2f} tokens"
    base, now = first.get("eval/distinct_2"), _mean([h.get("eval/distinct_2", 0.0) for h in recent])
    if base and (base - now) / base > th.distinct_drop:
        flags["repetition"] = f"repetition: distinct-2 fell {base:.3f} -> {now:.3f}"
    return flags


# ---------------------------------------------------------------------------------------- the evaluator

Responses = tuple[list[str], list[list[int]]]  # texts (P,), token ids (P, R_i)


Score = Callable[[list[str], list[str], list[dict[str, str]]], list[float]]  # (prompts, responses, metadatas)


@dataclass
class Evaluator:
    """Runs evaluations through injected functions, so the driver (Ray actors) and ``relay eval``
    (transformers in-process) share the numbers. Keeps the reference's cached responses and the history.

    - ``policy_greedy(prompts) -> (texts, ids)``; ``reference_greedy`` likewise (called once).
    - ``score(prompts, responses, metadatas) -> rewards``: the training reward (reward service or an RM).
    - ``true_score`` likewise: the held-out score (``train.eval_reward``); None = ``score``.
    - ``sample(prompts) -> (prompt_ids, response_ids, policy_logprobs)`` lists, one entry per sample; optional.
    - ``reference_logprobs(prompt_ids, response_ids) -> logprobs`` per sample; needed with ``sample``.
    - ``sample_k(prompts) -> [prompt][k] texts`` for pass@k and mean@k; optional.
    - ``extra_sets``: name -> (prompts, metadatas) of further eval sets (held-out score and pass@k only).
    """

    prompts: list[str]
    metadatas: list[dict[str, str]]
    policy_greedy: Callable[[list[str]], Responses]
    reference_greedy: Callable[[list[str]], Responses]
    score: Score
    true_score: Score | None = None
    sample: Callable[[list[str]], tuple[list[list[int]], list[list[int]], list[list[float]]]] | None = None
    reference_logprobs: Callable[[list[list[int]], list[list[int]]], list[list[float]]] | None = None
    sample_k: Callable[[list[str]], list[list[str]]] | None = None
    pass_threshold: float = 1.0
    name: str = "heldout"
    extra_sets: dict[str, tuple[list[str], list[dict[str, str]]]] = field(default_factory=dict)
    thresholds: HackingThresholds = field(default_factory=HackingThresholds)
    history: list[dict[str, float]] = field(default_factory=list)
    _reference_rewards: list[float] | None = None

    def __call__(self, log: Callable[[str], object] = print) -> dict[str, float]:
        texts, ids = self.policy_greedy(self.prompts)
        rewards = self.score(self.prompts, texts, self.metadatas)
        true = rewards if self.true_score is None else self.true_score(self.prompts, texts, self.metadatas)
        if self._reference_rewards is None:
            ref_texts, _ = self.reference_greedy(self.prompts)
            self._reference_rewards = self.score(self.prompts, ref_texts, self.metadatas)
        samples = EvalSamples(true, texts, ids, rewards, self._reference_rewards)
        if self.sample is not None and self.reference_logprobs is not None:
            prompt_ids, response_ids, logprobs = self.sample(self.prompts)
            samples.sample_logprobs = logprobs
            samples.sample_reference_logprobs = self.reference_logprobs(prompt_ids, response_ids)
        metrics = evaluation_metrics(samples)
        metrics[f"eval/set_task_score{{eval_set={self.name}}}"] = metrics["eval/task_score"]
        if self.sample_k is not None:
            metrics["eval/pass_at_k"], metrics["eval/mean_at_k"] = self._at_k(self.prompts, self.metadatas)
            metrics[f"eval/set_pass_at_k{{eval_set={self.name}}}"] = metrics["eval/pass_at_k"]
        for name, (prompts, metadatas) in self.extra_sets.items():
            extra, _ = self.policy_greedy(prompts)
            scored = (self.true_score or self.score)(prompts, extra, metadatas)
            metrics[f"eval/set_task_score{{eval_set={name}}}"] = _mean(scored)
            if self.sample_k is not None:
                metrics[f"eval/set_pass_at_k{{eval_set={name}}}"] = self._at_k(prompts, metadatas)[0]
        self.history.append(metrics)
        flags = reward_hacking_flags(self.history, self.thresholds, has_true_score=self.true_score is not None)
        metrics["eval/reward_hacking_flag"] = float(bool(flags))
        metrics.update({f"eval/reward_hacking_signal{{signal={name}}}": float(name in flags)
                        for name in HACKING_SIGNALS})
        for name, why in flags.items():
            log(f"reward-hacking monitor ({name}): {why}")
        return metrics

    def state(self) -> dict:
        """What a resumed run needs: the reference's scores (the policy is no longer the reference then) and the
        history the hacking monitor reads."""
        return {"reference_rewards": self._reference_rewards, "history": self.history}

    def restore(self, state: dict) -> None:
        self._reference_rewards, self.history = state["reference_rewards"], list(state["history"])

    def _at_k(self, prompts: list[str], metadatas: list[dict[str, str]]) -> tuple[float, float]:
        groups = self.sample_k(prompts)  # (P, k)
        k = len(groups[0])
        flat = (self.true_score or self.score)([p for p in prompts for _ in range(k)], [r for g in groups for r in g],
                                               [m for m in metadatas for _ in range(k)])
        return pass_and_mean_at_k([flat[i * k:(i + 1) * k] for i in range(len(prompts))], self.pass_threshold)


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

    by_text = {p.text: p for ps in driver.eval_sets.values() for p in ps}

    def greedy(texts: list[str]) -> Responses:
        out = driver.fleet.greedy([by_text[t] for t in texts])
        return out, [driver.tokenizer.encode(t, add_special_tokens=False) for t in out]

    def scorer(client) -> Score:
        def score(texts: list[str], responses: list[str], metadatas: list[dict[str, str]]) -> list[float]:
            results = client.score([RewardRequest(p, r, m) for p, r, m in zip(texts, responses, metadatas,
                                                                                strict=True)])
            return [0.0 if res.reward is None else res.reward for res in results]  # excluded samples score 0
        return score

    def sample(texts: list[str]):
        rollouts, _ = driver.fleet.generate([by_text[t] for t in texts[:KL_PROMPTS]])
        return ([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                [r.sampling_logprobs for r in rollouts])

    def sample_k(texts: list[str]) -> list[list[str]]:
        k = driver.cfg.train.eval_k
        rollouts, _ = driver.fleet.generate([by_text[t] for t in texts], k)
        return [[r.response_text for r in rollouts[i * k:(i + 1) * k]] for i in range(len(texts))]

    (name, main), *rest = driver.eval_sets.items()
    reference = AutoModelForCausalLM.from_pretrained(driver.policy_path).eval()
    return Evaluator(
        prompts=[p.text for p in main], metadatas=[p.metadata for p in main],
        policy_greedy=greedy, reference_greedy=greedy, score=scorer(driver.reward),
        true_score=scorer(driver.eval_reward) if driver.eval_reward is not None else None,
        sample=sample, reference_logprobs=reference_logprob_fn(reference),
        sample_k=sample_k if driver.cfg.train.eval_k else None, pass_threshold=driver.cfg.train.eval_pass_threshold,
        name=name, extra_sets={n: ([p.text for p in ps], [p.metadata for p in ps]) for n, ps in rest},
    )


# ---------------------------------------------------------------------------------------- relay eval


def local_score(sources) -> Score:
    """Score in this process with the reward service's own scorer classes and combiner (no Serve): what
    ``relay eval`` uses for ``train.eval_reward`` or ``reward.sources``."""
    import asyncio

    from reward_service.app import SCORERS
    from reward_service.combine import combine
    from reward_service.records import RewardRequest

    scorers = {src.name: SCORERS[src.kind](src) for src in sources}
    weights = {src.name: src.weight for src in sources}
    loop = asyncio.new_event_loop()  # one loop: the scorers' semaphores bind to the loop that first uses them

    def score(prompts: list[str], responses: list[str], metadatas: list[dict[str, str]]) -> list[float]:
        requests = [RewardRequest(p, r, m) for p, r, m in zip(prompts, responses, metadatas, strict=True)]

        async def run():
            return await asyncio.gather(*(s.score(requests) for s in scorers.values()))

        per_source = dict(zip(scorers, loop.run_until_complete(run()), strict=True))
        rewards = [combine(req, {n: per_source[n][i] for n in per_source}, weights)[0]
                   for i, req in enumerate(requests)]
        return [0.0 if r is None else r for r in rewards]  # excluded samples score 0, as in the driver

    return score


def evaluate_checkpoints(cfg, policy: str, reference: str, rm: str | None = None,
                         log: Callable[[str], object] = print) -> dict[str, float]:
    """``relay eval``: one evaluation of ``policy`` against ``reference`` in this process (no Ray).

    The held-out score comes from ``train.eval_reward`` or else ``reward.sources``, run in this process
    (``local_score``); the reward columns (RM score, win rate) from the reward model at ``rm`` (a
    ``learner/rm_trainer.py`` checkpoint, or an ensemble's directory) when given, else from the same reward.
    Held-out prompts are the driver's: the first ``train.eval_prompts`` of the main eval set; one sampled response
    per prompt estimates the KL.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.data import format_prompt, load_splits

    g = cfg.generation
    held_out = load_splits(cfg.data, cfg.model.cache_dir, log=log).main_eval[: cfg.train.eval_prompts]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or policy)
    pol = AutoModelForCausalLM.from_pretrained(policy).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    true_score = local_score(cfg.train.eval_reward or cfg.reward.sources)
    score = true_score
    if rm is not None:
        from learner.rm_trainer import load_scorer
        from reward_service.models import join_text

        reward_model = load_scorer(rm)  # one reward model, or an ensemble's directory

        def score(prompts: list[str], responses: list[str], metadatas: list[dict[str, str]]) -> list[float]:
            with torch.inference_mode():
                return reward_model([join_text(p, r) for p, r in zip(prompts, responses, strict=True)])[0]

    evaluator = Evaluator(
        prompts=[format_prompt(e, cfg.data, tokenizer) for e in held_out], metadatas=[e.metadata for e in held_out],
        policy_greedy=hf_greedy_fn(pol, tokenizer, g.max_tokens),
        reference_greedy=hf_greedy_fn(ref, tokenizer, g.max_tokens), score=score, true_score=true_score,
        sample=hf_sample_fn(pol, tokenizer, g.max_tokens, g.temperature, seed=g.seed),
        reference_logprobs=reference_logprob_fn(ref),
    )
    return evaluator(log=log)
