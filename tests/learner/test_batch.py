"""Collation aligns the sampler's logprobs and the response mask to next-token positions."""

import random

import pytest
import torch

from core.records import Rollout, ScoredRollout
from learner.batch import collate


def rollout(prompt, response, lps, group=0):
    return ScoredRollout(Rollout(group, prompt, response, lps, 0, "stop", "", ""), 1.0)


def test_positions_predict_response_tokens():
    b = collate([rollout([5, 6, 7], [8, 9], [-0.1, -0.2]), rollout([5], [8, 9, 10], [-1, -2, -3], group=1)], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9], [5, 8, 9, 10, 0]]
    # position t predicts token t+1: row 0 predicts 8 at t=2 and 9 at t=3
    assert b.response_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]
    assert torch.allclose(b.behaviour_logprobs[0], torch.tensor([0, 0, -0.1, -0.2]))
    assert torch.allclose(b.behaviour_logprobs[1], torch.tensor([-1.0, -2.0, -3.0, 0]))
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b.group_ids.tolist() == [0, 1]


def _collate_row_by_row(scored, pad_id, width=None):
    """The second formulation: one row at a time, as the learner collated before it was vectorised."""
    rows = [(s.rollout.prompt_ids, s.rollout.response_ids) for s in scored]
    width = max([width or 2, *(len(a) + len(b) for a, b in rows)])
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention, mask, lps = torch.zeros_like(ids), torch.zeros(len(rows), width - 1), torch.zeros(len(rows), width - 1)
    for i, s in enumerate(scored):
        p, r = len(s.rollout.prompt_ids), len(s.rollout.response_ids)
        ids[i, : p + r] = torch.tensor(s.rollout.prompt_ids + s.rollout.response_ids)
        attention[i, : p + r] = 1
        mask[i, p - 1 : p - 1 + r] = 1
        lps[i, p - 1 : p - 1 + r] = torch.tensor(s.rollout.sampling_logprobs)
    return ids, attention, mask, lps


@pytest.mark.parametrize("width", [None, 40])
def test_collation_matches_a_row_by_row_formulation(width):
    gen = random.Random(0)
    scored = []
    for i in range(50):
        p, r = gen.randint(1, 12), gen.randint(0, 15)  # an empty response too
        scored.append(rollout([gen.randint(1, 99) for _ in range(p)], [gen.randint(1, 99) for _ in range(r)],
                              [-gen.random() for _ in range(r)], group=i // 4))
    b = collate(scored, pad_id=7, width=width)
    ids, attention, mask, lps = _collate_row_by_row(scored, 7, width)
    assert b.input_ids.shape == (50, width or max(len(s.rollout.prompt_ids) + len(s.rollout.response_ids)
                                                 for s in scored))
    assert torch.equal(b.input_ids, ids) and torch.equal(b.attention_mask, attention)
    assert torch.equal(b.response_mask, mask) and torch.equal(b.behaviour_logprobs, lps)
    assert b.group_ids.tolist() == [i // 4 for i in range(50)]


def test_zero_rows_at_a_width_and_a_logprob_count_that_does_not_match():
    empty = collate([], pad_id=0, width=6)
    assert empty.input_ids.shape == (0, 6) and empty.response_mask.shape == (0, 5)
    with pytest.raises(ValueError, match="group 3 has 2 prompt tokens and 1 sampling logprobs for 2 response tokens"):
        collate([rollout([5], [8], [-1.0]), rollout([5, 6], [8, 9], [-1.0], group=3)], pad_id=0)
    with pytest.raises(ValueError, match="group 4 has 1 prompt tokens and 2 sampling logprobs for 1 response"):
        # one too many here, one too few next: the counts add up, and would have shifted a logprob a row
        collate([rollout([5], [8], [-1.0, -2.0], group=4), rollout([5], [8, 9], [-1.0], group=5)], pad_id=0)
    with pytest.raises(ValueError, match="group 6 has 0 prompt tokens"):
        collate([rollout([], [8], [-1.0], group=6)], pad_id=0)
