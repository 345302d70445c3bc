"""The learner's batch record, built from scored rollouts, and its token-budget micro-batches.

Positions are the model's next-token predictions: column t of every ``(B, T)`` tensor here
is about token ``input_ids[:, t + 1]``, so a response mask marks the positions whose
*target* is a response token. Sequences are right-padded.

The record carries what the learner computes during a step beside what the sampler sent
(old and reference logprobs, values, advantages, returns, the loss mask), so slicing a
micro-batch slices all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from itertools import chain

import torch

from core.records import PreferencePair, RewardedSequence, ScoredRollout

_PER_POSITION = ("response_mask", "behaviour_logprobs", "loss_mask", "old_logprobs", "ref_logprobs", "values",
                 "advantages", "returns")


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
    # Filled by the learner during a step, (B, T) each:
    loss_mask: torch.Tensor | None = None  # the tokens the policy loss sees (response, less masked-out samples)
    old_logprobs: torch.Tensor | None = None  # the policy before this step's update (None: from the same pass)
    ref_logprobs: torch.Tensor | None = None  # the frozen reference's
    values: torch.Tensor | None = None  # the value function's V(s_t) before the update
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor, trim: bool = True) -> RolloutBatch:
        """Rows ``idx`` of every field, trimmed to the longest of them (less padding per micro-batch) unless
        ``trim`` is False (ranks of a group keep one width, so per-position statistics line up)."""
        rows = {f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx] for f in fields(self)}
        if not trim:
            return RolloutBatch(**rows)
        width = int(rows["attention_mask"].sum(1).max().item()) if len(idx) else 1
        width = max(width, 2)
        rows["input_ids"], rows["attention_mask"] = rows["input_ids"][:, :width], rows["attention_mask"][:, :width]
        for name in _PER_POSITION:
            if rows[name] is not None:
                rows[name] = rows[name][:, : width - 1]
        return RolloutBatch(**rows)

    def with_fields(self, **tensors: torch.Tensor | None) -> RolloutBatch:
        return replace(self, **tensors)

    def lengths(self) -> torch.Tensor:
        """(B,) real tokens (prompt + response) per row."""
        return self.attention_mask.sum(1)


def collate(scored: list[ScoredRollout], pad_id: int, width: int | None = None) -> RolloutBatch:
    """Right-pad prompt+response ids to ``width`` (default: the longest) and align the sampler's logprobs to
    prediction positions. Ranks of a learner group pad to one width, so per-position statistics line up;
    a rank with no rollouts gets a batch of zero rows at that width."""
    if not scored and width is None:
        raise ValueError("cannot build a batch from zero rollouts")
    rollouts = [s.rollout for s in scored]
    batch = _collate_sequences([(r.prompt_ids, r.response_ids) for r in rollouts], [r.group_id for r in rollouts],
                               pad_id, width)
    for r in rollouts:  # checked per row: counts that only add up would shift logprobs onto other rows
        if len(r.sampling_logprobs) != len(r.response_ids) or not r.prompt_ids:
            raise ValueError(f"rollout of group {r.group_id} has {len(r.prompt_ids)} prompt tokens and "
                             f"{len(r.sampling_logprobs)} sampling logprobs for {len(r.response_ids)} response tokens: "
                             "the sampler must return one logprob per response token, after a prompt of one or more")
    # token p + j (response token j) is predicted at position p + j - 1
    logprobs = torch.tensor(list(chain.from_iterable(r.sampling_logprobs for r in rollouts)), dtype=torch.float32)
    row, j = _ragged(torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.long))
    prompt_len = torch.tensor([len(r.prompt_ids) for r in rollouts], dtype=torch.long)
    batch.behaviour_logprobs[row, prompt_len[row] + j - 1] = logprobs
    return batch.with_fields(
        rewards=torch.tensor([s.reward for s in scored], dtype=torch.float32),
        versions=torch.tensor([r.policy_version for r in rollouts], dtype=torch.long),
        truncated=torch.tensor([r.finish_reason == "length" for r in rollouts], dtype=torch.bool),
    )


def token_budget_split(lengths: torch.Tensor, rows: torch.Tensor, budget: int,
                       groups: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Cut ``rows`` (indices into ``lengths``) into micro-batches whose padded size, rows x longest row, stays
    within ``budget`` tokens. Rows are sorted by length first, so long and short responses do not share a
    micro-batch and padding is small; a row longer than the budget is a micro-batch of its own. With
    ``groups`` (a group id per row of ``lengths``) the rows of a group stay next to each other (groups
    ordered by their longest row, longest first), so that a micro-batch holds whole groups where the
    budget allows and their shared prompt is computed once (``learner/shared_prompt.py``)."""
    if len(rows) == 0:
        return []
    if groups is None:
        ordered = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
    else:
        length, group = lengths[rows].tolist(), groups[rows].tolist()
        longest: dict[int, int] = {}
        for g, n in zip(group, length, strict=True):
            longest[g] = max(longest.get(g, 0), n)
        order = sorted(range(len(length)), key=lambda i: (-longest[group[i]], group[i], -length[i]))
        ordered = rows[torch.tensor(order, dtype=torch.long)]
    out, start = [], 0
    longest = int(lengths[ordered[0]])
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or (i - start + 1) * longest > budget:
            out.append(ordered[start:i])
            if i < len(ordered):
                start, longest = i, int(lengths[ordered[i]])
    return out


def padded_tokens(lengths: torch.Tensor, micro: list[torch.Tensor]) -> tuple[float, float]:
    """(real, padded) tokens the forward passes of the micro-batches ``micro`` see: 1 - real / padded is the
    padding fraction."""
    real = float(sum(int(lengths[m].sum()) for m in micro if len(m)))
    return real, float(sum(len(m) * int(lengths[m].max()) for m in micro if len(m)))


def collate_pairs(pairs: list[PreferencePair], pad_id: int, width: int | None = None) -> RolloutBatch:
    """Preference pairs as one batch of 2B rows: the B chosen sequences, then the B rejected ones (row i and
    row B + i are one pair); ``group_ids`` holds the pair's index. Fields RL needs are zero."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return _collate_sequences(rows, [p.index for p in pairs] * 2, pad_id, width)


def collate_rewarded(samples: list[RewardedSequence], pad_id: int, width: int | None = None) -> RolloutBatch:
    """(prompt, response, reward) records as a batch; ``rewards`` holds their rewards."""
    batch = _collate_sequences([(s.prompt_ids, s.response_ids) for s in samples], [s.index for s in samples],
                               pad_id, width)
    return batch.with_fields(rewards=torch.tensor([s.reward for s in samples], dtype=torch.float32))


def _collate_sequences(rows: list[tuple[list[int], list[int]]], index: list[int], pad_id: int,
                       width: int | None) -> RolloutBatch:
    """One tensor op per field rather than one per row: the learner collates every step (512 rows on the default
    task, a tenth of its step when this was a loop over rows)."""
    prompt_len = torch.tensor([len(a) for a, _ in rows], dtype=torch.long)
    length = prompt_len + torch.tensor([len(b) for _, b in rows], dtype=torch.long)
    width = max(width or 2, int(length.max()) if rows else 0)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    tokens = chain.from_iterable(chain.from_iterable(rows))  # each row's prompt, then its response, row after row
    input_ids[_ragged(length)] = torch.tensor(list(tokens), dtype=torch.long)
    attention = (torch.arange(width) < length.unsqueeze(1)).long()
    position = torch.arange(width - 1)  # position t predicts token t + 1: the response's are p - 1 .. len - 2
    response_mask = ((position >= prompt_len.unsqueeze(1) - 1) & (position < length.unsqueeze(1) - 1)).float()
    return RolloutBatch(input_ids, attention, response_mask, torch.zeros((n, width - 1)), torch.zeros(n),
                        torch.tensor(index, dtype=torch.long), torch.zeros(n, dtype=torch.long),
                        torch.zeros(n, dtype=torch.bool))


def _ragged(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every element of rows of these ``lengths`` laid end to end, as index tensors."""
    row = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    start = torch.cumsum(lengths, 0) - lengths
    return row, torch.arange(len(row)) - start[row]
