"""The learner-internal padded batch, built from scored rollouts.

Positions are the model's next-token predictions: column t of every ``(B, T)`` tensor here
is about token ``input_ids[:, t + 1]``, so a response mask marks the positions whose
*target* is a response token. Sequences are right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.records import ScoredRollout


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # (B, T+1) prompt + response token ids, right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T+1) 1 on real tokens
    response_mask: torch.Tensor  # (B, T) 1 where the predicted token is a response token
    behaviour_logprobs: torch.Tensor  # (B, T) the sampler's (vLLM's) logprobs, 0 off the response
    rewards: torch.Tensor  # (B,) scalar reward per sequence
    group_ids: torch.Tensor  # (B,) long; samples of one prompt share it
    versions: torch.Tensor  # (B,) long; policy_version that sampled each rollout
    truncated: torch.Tensor  # (B,) bool; the response was cut at max_tokens

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> RolloutBatch:
        return RolloutBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def collate(scored: list[ScoredRollout], pad_id: int) -> RolloutBatch:
    """Right-pad prompt+response ids and align the sampler's logprobs to prediction positions."""
    if not scored:
        raise ValueError("cannot build a batch from zero rollouts")
    width = max(len(s.rollout.prompt_ids) + len(s.rollout.response_ids) for s in scored)
    b = len(scored)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    response_mask = torch.zeros((b, width - 1))
    behaviour = torch.zeros((b, width - 1))
    for i, s in enumerate(scored):
        r = s.rollout
        ids = r.prompt_ids + r.response_ids
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        # token p + j (response token j) is predicted at position p + j - 1
        response_mask[i, p - 1 : p - 1 + n] = 1
        behaviour[i, p - 1 : p - 1 + n] = torch.tensor(r.sampling_logprobs)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention,
        response_mask=response_mask,
        behaviour_logprobs=behaviour,
        rewards=torch.tensor([s.reward for s in scored], dtype=torch.float32),
        group_ids=torch.tensor([s.rollout.group_id for s in scored], dtype=torch.long),
        versions=torch.tensor([s.rollout.policy_version for s in scored], dtype=torch.long),
        truncated=torch.tensor([s.rollout.finish_reason == "length" for s in scored], dtype=torch.bool),
    )
