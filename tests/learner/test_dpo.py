"""Preference optimisation on the learner, without Ray: the gradient against a plain PyTorch formulation written
here (summed log-probs of each pair in its own forward pass, a frozen reference copy), the cached reference
log-probs, a few steps that learn, and every kind of bad pair."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cluster.config import load_config
from core.data import DataError
from learner.bootstrap import build_tokenizer
from learner.config import AlgorithmConfig, DPOConfig
from learner.learner import Learner
from learner.preferences import encode_pairs, pairs_from_samples, split_pairs_by_prompt

ROWS = [{"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + d)}
        for a, b, d in [(12, 30, 1), (45, 11, -2), (70, 22, 10), (33, 33, 5), (18, 61, -1), (50, 49, 3)]]




def _learner(path: str, overrides: list[str] = ()) -> Learner:
    cfg = load_config(None, ["learner.torch_threads=1", "learner.warmup_steps=0", *overrides])
    return Learner(path, AlgorithmConfig(), cfg.learner, "float32", 1.0, 8)


def _pairs():
    return encode_pairs(ROWS, build_tokenizer(), max_length=64)


def _plain_logps(model, pair) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(response | prompt), summed over the response tokens, one sequence per forward pass."""
    out = []
    for response in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([pair.prompt_ids + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = ids[0, 1:]
        start = len(pair.prompt_ids) - 1
        out.append(sum(logp[t, targets[t]] for t in range(start, start + len(response))))
    return out[0], out[1]


@pytest.mark.parametrize("loss,smoothing", [("dpo", 0.0), ("ipo", 0.0), ("cdpo", 0.2)])
def test_gradient_equals_a_plain_formulation(loss, smoothing, policy_dir):
    pairs = _pairs()
    learner = _learner(policy_dir, ["learner.lr=1e-30", "learner.max_grad_norm=1e9",
                                    "learner.micro_batch_tokens=40"])  # several micro-batches
    reference = learner.pair_logprobs(pairs)
    cfg = DPOConfig(loss=loss, beta=0.5, label_smoothing=smoothing)
    learner.preference_step(pairs, reference, cfg)

    plain = copy.deepcopy(learner.policy)  # lr 1e-30: the weights the gradient was taken at
    frozen = copy.deepcopy(plain).requires_grad_(False)
    plain.zero_grad()
    losses = []
    for pair in pairs:
        pc, pr = _plain_logps(plain, pair)
        with torch.no_grad():
            rc, rr = _plain_logps(frozen, pair)
        h = (pc - rc) - (pr - rr)
        if loss == "ipo":  # Azar et al. 2023, eq. 17 with tau = beta
            losses.append((h - 1 / (2 * 0.5)) ** 2)
        else:  # Rafailov et al. 2023; cDPO flips each label with probability eps
            losses.append(-(1 - smoothing) * F.logsigmoid(0.5 * h) - smoothing * F.logsigmoid(-0.5 * h))
    torch.stack(losses).mean().backward()
    checked = 0
    for (name, ours), theirs in zip(learner.policy.named_parameters(), plain.parameters(), strict=True):
        # float32 rounding: 1.2e-6 on a gradient of 2.6 on an Intel Xeon (AVX-512) instance, a few ulps
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-6, msg=name)
        checked += int(theirs.grad.abs().max() > 1e-4)
    assert checked > 10  # the gradients are not all ~0


def test_reference_logprobs_are_summed_response_logprobs(policy_dir):
    pairs = _pairs()
    learner = _learner(policy_dir)
    cached = learner.pair_logprobs(pairs)
    for pair, (c, r) in zip(pairs, cached, strict=True):
        with torch.no_grad():
            pc, pr = _plain_logps(learner.policy, pair)
        assert c == pytest.approx(pc.item(), abs=1e-5) and r == pytest.approx(pr.item(), abs=1e-5)
    mean = learner.pair_logprobs(pairs, length_normalize=True)
    assert mean[0][0] == pytest.approx(cached[0][0] / len(pairs[0].chosen_ids), abs=1e-5)


def test_a_few_steps_raise_the_margin_and_accuracy(policy_dir):
    pairs = _pairs()
    learner = _learner(policy_dir, ["learner.lr=3e-3"])
    reference = learner.pair_logprobs(pairs)
    cfg = DPOConfig(beta=0.1)
    first = learner.preference_step(pairs, reference, cfg, train=False)
    assert first["offline/margin"] == pytest.approx(0.0, abs=1e-6) and first["offline/loss"] == pytest.approx(
        -F.logsigmoid(torch.tensor(0.0)).item(), abs=1e-5)  # policy = reference: h = 0, loss log 2
    for _ in range(15):
        learner.preference_step(pairs, reference, cfg)
    last = learner.preference_step(pairs, reference, cfg, train=False)
    assert last["offline/loss"] < first["offline/loss"] - 0.05
    assert last["offline/margin"] > 0.1 and last["offline/accuracy"] == 1.0


BAD = [
    ({"prompt": "1+1=", "chosen": "2", "rejected": "2"}, "chosen and rejected are the same text"),
    ({"prompt": "1+1=", "chosen": "", "rejected": "3"}, "the chosen response is empty"),
    ({"prompt": "1+1=", "chosen": "2"}, "has no 'rejected'"),
    ({"prompt": "1+1=" * 40, "chosen": "2", "rejected": "3"}, "longer than the context"),
    ({"prompt": "1+1=", "chosen": 2, "rejected": "3"}, "must be a string or a list of chat messages"),
]


@pytest.mark.parametrize("row,message", BAD, ids=[m.split()[-1] for _, m in BAD])
def test_bad_pairs_follow_on_invalid(row, message):
    rows = [ROWS[0], row, ROWS[1]]
    with pytest.raises(DataError, match=f"prefs record 2.*{message}|prefs record 2 {message}"):
        encode_pairs(rows, build_tokenizer(), max_length=64, on_invalid="error", where="prefs")
    skipped: dict[str, int] = {}
    kept = encode_pairs(rows, build_tokenizer(), max_length=64, on_invalid="skip", skipped=skipped, where="prefs",
                        log=lambda _: None)
    assert len(kept) == 2 and sum(skipped.values()) == 1
    assert [p.index for p in kept] == [0, 1]


def test_chat_message_records():
    tokenizer = build_tokenizer()
    rows = [{"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}]
    pair = encode_pairs(rows, tokenizer, max_length=64)[0]
    assert pair.chosen_ids == tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]


def test_pairs_from_samples_and_split_by_prompt():
    samples = [["1", "2", "2"], ["3", "3"], ["x", "y"], ["5", ""]]  # d: the empty sample is left out, no pair
    rows = pairs_from_samples(["a", "b", "c", "d"], [{}] * 4, samples, [[1.0, 0.0, 0.0], [0.0, 0.0], [0.0, 0.5],
                                                                         [1.0, 0.0]])
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in rows] == [("a", "1", "2"), ("c", "y", "x")]
    train, held = split_pairs_by_prompt(rows * 2, 0.5, seed=0)
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in held}) and len(train) + len(held) == 4


def test_rwr_weights_and_weighted_likelihood_by_hand():
    """Online RWR: weights exp(z / beta) over the batch, mean 1; the nll loss is -sum w log pi / tokens."""
    from learner import algos, losses

    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    token_rewards = algos.place_reward_on_last_token(rewards, mask)
    w, _ = algos.get_advantage_estimator("rwr")(token_rewards=token_rewards, mask=mask, beta=0.5)
    z = (rewards - 0.5) / rewards.std()  # whitened with the unbiased std, as masked_whiten
    expected = torch.exp(z / 0.5) / torch.exp(z / 0.5).mean()
    torch.testing.assert_close(w[:, 0], expected)
    assert torch.equal(w * (1 - mask), torch.zeros_like(w))
    raw, _ = algos.get_advantage_estimator("rwr")(token_rewards=token_rewards, mask=mask, beta=1.0, whiten=False)
    torch.testing.assert_close(raw[:, 0], torch.exp(rewards) / torch.exp(rewards).mean())
    torch.testing.assert_close(w[:, 0], losses.rwr_weights(rewards, beta=0.5))  # the offline helper agrees

    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0], [-3.0, -1.0], [-2.0, 0.0]], requires_grad=True)
    loss, stats = losses.get_policy_loss("nll")(logprobs, logprobs.detach(), w, mask)
    hand = -(w * logprobs * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, hand)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -w * mask / mask.sum())  # every token keeps its gradient
    assert load_config(None, ["algorithm.name=rwr"]).algorithm.policy_loss == "nll"
    assert load_config(None, []).algorithm.policy_loss == "ppo"


def test_offline_rwr_gradient_equals_a_plain_formulation(policy_dir):
    from core.records import RewardedSequence
    from learner import losses

    tokenizer = build_tokenizer()
    eos = [tokenizer.eos_token_id]
    samples = [RewardedSequence(tokenizer.encode(r["prompt"], add_special_tokens=False),
                                tokenizer.encode(text, add_special_tokens=False) + eos, reward, i)
               for i, (r, text, reward) in enumerate([(ROWS[0], "42", 1.0), (ROWS[0], "41", 0.0), (ROWS[1], "56", 1.0),
                                                      (ROWS[2], "99", 0.0), (ROWS[3], "66", 1.0)])]
    weights = losses.rwr_weights(torch.tensor([s.reward for s in samples]), beta=0.5)
    learner = _learner(policy_dir, ["learner.lr=1e-30", "learner.max_grad_norm=1e9", "learner.micro_batch_tokens=20"])
    stats = learner.weighted_nll_step(samples, weights.tolist())

    plain = copy.deepcopy(learner.policy)
    plain.zero_grad()
    total = 0.0
    for s, w in zip(samples, weights, strict=True):
        pair = type("P", (), {"prompt_ids": s.prompt_ids, "chosen_ids": s.response_ids, "rejected_ids": s.response_ids})
        logp, _ = _plain_logps(plain, pair)
        total = total - w * logp
    (total / len(samples)).backward()
    assert stats["offline/loss"] == pytest.approx(total.item() / len(samples), abs=1e-5)
    for (name, ours), theirs in zip(learner.policy.named_parameters(), plain.parameters(), strict=True):
        # float32 rounding: 1.2e-6 on a gradient of 2.6 on an Intel Xeon (AVX-512) instance, a few ulps
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-6, msg=name)
