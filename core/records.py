"""Records that cross actor boundaries (see DESIGN.md, "Records")."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prompt:
    """One prompt handed to a generation actor."""

    index: int
    """position of the prompt in this step's batch; also the group id of its samples"""
    text: str
    token_ids: list[int]  # (P,)
    metadata: dict[str, str] = field(default_factory=dict)
    """task metadata carried to the reward, e.g. {"answer": "81"}"""


@dataclass(frozen=True)
class Rollout:
    """One sampled response, as the generation actor returns it."""

    group_id: int
    """prompts sampled n times share it"""
    prompt_ids: list[int]  # (P,)
    response_ids: list[int]  # (R,)
    sampling_logprobs: list[float]  # (R,) log pi_sampler(token) for each response token
    policy_version: int
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (hit max_tokens)"""
    prompt_text: str
    response_text: str
    metadata: dict[str, str] = field(default_factory=dict)
    actor_id: int = 0
    token_versions: list[int] = field(default_factory=list)  # (R,)
    """with generation.partial_rollouts: the policy version that sampled each response token (policy_version is
    the oldest); empty = every token came from policy_version"""


@dataclass(frozen=True)
class Generated:
    """What one generate call of a generation actor returns."""

    rollouts: list[Rollout]
    """grouped by prompt, in prompt order"""
    seconds: float
    """wall time of the call in the actor"""
    swap_seconds: float = 0.0
    """of those, the time spent swapping in weights staged in the background (hidden sync's only stop)"""


@dataclass(frozen=True)
class ScoredRollout:
    """A rollout and the reward the reward service gave it."""

    rollout: Rollout
    reward: float
    components: dict[str, float] = field(default_factory=dict)
    """named parts of the reward before weighting, e.g. {"exact_match": 1.0, "length": -0.1}"""


@dataclass(frozen=True)
class PreferencePair:
    """A preference, tokenised: the same prompt with a chosen and a rejected response (each ending in EOS)."""

    prompt_ids: list[int]  # (P,)
    chosen_ids: list[int]  # (C,)
    rejected_ids: list[int]  # (R,)
    index: int = 0
    """position in its dataset, so a cached reference log-prob and an error message can name it"""


@dataclass(frozen=True)
class RewardedSequence:
    """A tokenised (prompt, response, reward) record: what offline reward-weighted regression trains on."""

    prompt_ids: list[int]  # (P,)
    response_ids: list[int]  # (R,), ending in EOS
    reward: float
    index: int = 0
