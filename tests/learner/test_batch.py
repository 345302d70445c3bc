"""Collation aligns the sampler's logprobs and the response mask to next-token positions."""

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
