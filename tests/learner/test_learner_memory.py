"""The learner's memory options, without Ray: token-budget micro-batches, gradient checkpointing and LoRA.

Each must leave the update what it was (the same step within rounding), or, for LoRA, train only the
adapters and publish the merged weights that ``peft`` itself would merge.
"""

from __future__ import annotations

import copy

import pytest
import torch

from cluster.config import load_config
from learner.batch import collate, padded_tokens, token_budget_split
from learner.learner import ADAPTER_DIR, Learner
from tests.learner.rollouts import scored_rollouts

# lr 1e-4: Adam's first step is about lr * sign(g), so rounding-level gradients near 0 can move by +-lr
BASE = ["learner.lr=1e-4", "learner.warmup_steps=0", "learner.torch_threads=1", "algorithm.kl_in=loss",
        "algorithm.kl_coef=0.1"]
BATCH = scored_rollouts(n_prompts=5, samples=4, seed=7)
LORA = ["learner.lora.r=4", "learner.lora.alpha=8", "learner.lr=1e-2"]




def _learner(overrides: list[str], path: str, reference: str | None = None) -> Learner:
    cfg = load_config(None, [*BASE, *overrides])
    return Learner(path, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                   cfg.generation.max_tokens, reference_path=reference)


def _weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in learner._named_weights()}


def test_token_budget_split_by_hand():
    lengths = torch.tensor([5, 9, 3, 9, 4])
    micro = token_budget_split(lengths, torch.arange(5), budget=18)
    # sorted by length: 9, 9 | 5, 4, 3 -> 2 x 9 = 18 fits, a third row of 9 would not; 3 x 5 = 15 fits
    assert [m.tolist() for m in micro] == [[1, 3], [0, 4, 2]]
    assert padded_tokens(lengths, micro) == (30.0, 33.0)
    assert [m.tolist() for m in token_budget_split(lengths, torch.tensor([2, 1]), budget=4)] == [[1], [2]]  # too long
    assert token_budget_split(lengths, torch.arange(0), budget=18) == []


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batches_do_not_change_the_step(agg, policy_dir):
    """One pass over the whole batch against many small micro-batches: the loss is normalised by the whole
    minibatch's token (or sequence) count either way."""
    whole = _learner([f"algorithm.loss_agg={agg}"], policy_dir)
    split = _learner([f"algorithm.loss_agg={agg}", "learner.micro_batch_tokens=24"], policy_dir)
    start = _weights(whole)
    assert len(token_budget_split(collate(BATCH, 0).lengths(), torch.arange(len(BATCH)), 24)) > 5
    stats = split.train_step(BATCH)
    whole.train_step(BATCH)
    a, b = _weights(whole), _weights(split)
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 5e-5
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-5, rtol=0, msg=n)
    assert 0.0 <= stats["learner/padding_fraction"] < 0.2  # sorted by length: little padding


def _layer_calls(learner: Learner) -> list[int]:
    """Counts the runs of one MLP's forward (a wrapper, since torch runs no hooks while it recomputes)."""
    calls, mlp = [0], learner.policy.model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


def test_gradient_checkpointing_gives_the_same_step(policy_dir):
    plain, ckpt = _learner([], policy_dir), _learner(["learner.gradient_checkpointing=true"], policy_dir)
    assert ckpt.policy.is_gradient_checkpointing
    calls_plain, calls_ckpt = _layer_calls(plain), _layer_calls(ckpt)
    plain.train_step(BATCH)
    ckpt.train_step(BATCH)
    # the reference and the "old" passes run once each; checkpointing recomputes the layer in the backward pass
    assert calls_ckpt[0] == calls_plain[0] + 1, (calls_plain, calls_ckpt)
    assert not ckpt.policy.training  # eval mode again after the update
    a, b = _weights(plain), _weights(ckpt)
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0, msg=n)


def test_lora_trains_adapters_publishes_merged_weights_and_resumes(policy_dir, tmp_path):
    from peft import PeftModel

    learner = _learner(LORA, policy_dir)
    base_before = {n: p.detach().clone() for n, p in learner._base().named_parameters() if "lora_" not in n}
    assert all("lora_" in n for n, p in learner.policy.named_parameters() if p.requires_grad)
    for batch in (BATCH, scored_rollouts(n_prompts=5, samples=4, seed=8)):
        stats = learner.train_step(batch)
    assert stats["learner/kl"] > 0  # the reference (adapters off) and the policy (adapters on) differ now
    for n, p in learner._base().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n  # the base never moves

    published = _weights(learner)
    merged = copy.deepcopy(learner.policy).merge_and_unload()  # peft's own merge
    assert set(published) == {n for n, _ in merged.named_parameters()}
    unmerged = {n.replace(".base_layer", ""): p for n, p in base_before.items()}
    assert max((published[n] - unmerged[n]).abs().max().item() for n in published) > 1e-3
    for n, p in merged.named_parameters():
        torch.testing.assert_close(published[n], p.detach(), atol=1e-6, rtol=0, msg=n)

    learner.save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / ADAPTER_DIR / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    saved = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").named_parameters())  # the merged model
    adapters = tmp_path / "ckpt" / ADAPTER_DIR
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(policy_dir), adapters)
    for n, p in reloaded.merge_and_unload().named_parameters():
        torch.testing.assert_close(p, published[n], atol=1e-6, rtol=0, msg=n)
        torch.testing.assert_close(saved[n], published[n], atol=1e-6, rtol=0, msg=n)

    # Resume: the base from the original model, the adapters and optimizer from the checkpoint; the next step
    # is the one the first learner takes.
    resumed = _learner(LORA, str(tmp_path / "ckpt"), reference=policy_dir)
    resumed.load_state(str(tmp_path / "ckpt"))
    nxt = scored_rollouts(n_prompts=5, samples=4, seed=9)
    learner.train_step(nxt)
    resumed.train_step(nxt)
    a, b = _weights(learner), _weights(resumed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0, msg=n)
