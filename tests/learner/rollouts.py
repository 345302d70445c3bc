"""Hand-made scored rollouts for learner tests (no engine): ``a+b=`` prompts, digit responses."""

from __future__ import annotations

import math
import random

from core.records import Rollout, ScoredRollout
from learner.bootstrap import build_tokenizer


def scored_rollouts(n_prompts: int = 4, samples: int = 4, seed: int = 0) -> list[ScoredRollout]:
    """Hand-made rollouts: ``a+b=`` prompts, digit responses, reward 1 for the right sum."""
    tokenizer = build_tokenizer()
    rng = random.Random(seed)
    out = []
    for g in range(n_prompts):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        prompt = f"{a}+{b}="
        for _ in range(samples):
            answer = str(a + b) if rng.random() < 0.5 else str(rng.randint(20, 198))
            ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            rollout = Rollout(group_id=g, prompt_ids=tokenizer.encode(prompt, add_special_tokens=False),
                              response_ids=ids, sampling_logprobs=[-math.log(258)] * len(ids), policy_version=0,
                              finish_reason="stop", prompt_text=prompt, response_text=answer,
                              metadata={"answer": str(a + b)})
            out.append(ScoredRollout(rollout, float(answer == str(a + b))))
    return out
