"""The learner's memory options, without Ray: token-budget micro-batches, gradient checkpointing and LoRA.

Each must leave the update what it was (the same step within rounding), or, for LoRA, train only the
adapters and publish the merged weights that ``peft`` itself would merge.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from cluster.config import load_config
from learner.batch import collate, padded_tokens, token_budget_split
from learner.learner import Learner
from learner.policy_io import ADAPTER_DIR
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
    # one forward pass per micro-batch on both sides (the shared-prompt pass takes two; checkpointing turns it off)
    plain = _learner(["learner.share_prompts=false"], policy_dir)
    ckpt = _learner(["learner.gradient_checkpointing=true"], policy_dir)
    assert ckpt.policy.is_gradient_checkpointing and not ckpt.share_prompts
    calls_plain, calls_ckpt = _layer_calls(plain), _layer_calls(ckpt)
    plain.train_step(BATCH)
    ckpt.train_step(BATCH)
    # the reference and the "old" passes run once each; checkpointing recomputes the layer in the backward pass
    assert calls_ckpt[0] == calls_plain[0] + 1, (calls_plain, calls_ckpt)
    assert not ckpt.policy.training  # eval mode again after the update
    a, b = _weights(plain), _weights(ckpt)
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=0, msg=n)


def test_bf16_mixed_precision_keeps_float32_master_weights(policy_dir):
    """learner.mixed_precision=bf16: the forward passes compute in bfloat16 (logprobs near the float32 ones, not
    equal), the policy and AdamW's moments stay float32, the frozen reference is held in bfloat16, weights are
    published in model.dtype, and the step moves the weights as the float32 step does (Adam's first step is
    about lr * sign(g): the signs agree where the gradient is not at rounding level)."""
    plain = _learner([], policy_dir)
    mixed = _learner(["learner.mixed_precision=bf16", "model.dtype=bfloat16"], policy_dir)
    assert {p.dtype for p in mixed.policy.parameters()} == {torch.float32}
    assert {p.dtype for p in mixed.reference.parameters()} == {torch.bfloat16}
    assert mixed.publish_dtype == torch.bfloat16 and plain.publish_dtype is None
    batch = collate(BATCH, 0)
    lp_plain, lp_mixed = plain._no_grad_pass(plain.policy, batch)[0], mixed._no_grad_pass(mixed.policy, batch)[0]
    mask = batch.response_mask.bool()
    gap = (lp_plain - lp_mixed)[mask].abs()
    assert 0 < gap.max().item() < 0.02 and gap.mean().item() < 0.005, gap
    start = _weights(plain)
    plain.train_step(BATCH)
    stats = mixed.train_step(BATCH)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    moments = [s["exp_avg"] for s in mixed.optimizer.state.values()]
    assert moments and {m.dtype for m in moments} == {torch.float32}
    a, b = _weights(plain), _weights(mixed)
    moved = torch.cat([(a[n] - start[n]).flatten() for n in a])
    moved_mixed = torch.cat([(b[n] - start[n]).flatten() for n in a])
    clear = moved.abs() > 0.5e-4  # Adam's first step is +-1e-4 where the gradient is clear of rounding
    agree = (moved.sign() == moved_mixed.sign())[clear].float().mean().item()
    assert clear.sum() > 1000 and agree > 0.9, (int(clear.sum()), agree)
    ppo = _learner(["learner.mixed_precision=bf16", "algorithm.name=ppo", "algorithm.kl_in=reward"], policy_dir)
    assert {p.dtype for p in ppo.critic.parameters()} == {torch.float32}
    values = ppo.critic.values(batch, ppo.device)
    assert values.dtype == torch.float32 and math.isfinite(ppo.train_step(BATCH)["learner/value_loss"])


def test_min_tokens_mirrors_the_samplers_renormalisation(policy_dir):
    """With the sampler's min_tokens the learner's logprob of a response token among the first min_tokens is
    log p - log(1 - p_eos) under the unmasked model, and unchanged after them (vLLM's logprobs are of the
    distribution without the stop token)."""
    cfg = load_config(None, BASE)
    plain = _learner([], policy_dir)
    masked = Learner(policy_dir, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                     cfg.generation.max_tokens, min_tokens=2)
    assert masked.stop_ids == [masked.tokenizer.eos_token_id]
    batch = collate(BATCH, 0)
    lp, lp_plain = masked._no_grad_pass(masked.policy, batch)[0], plain._no_grad_pass(plain.policy, batch)[0]
    with torch.no_grad():
        logits = plain.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    p_eos = torch.softmax(logits.float(), -1)[..., masked.tokenizer.eos_token_id]
    index = batch.response_mask.cumsum(-1)  # 1, 2, ... along each response
    early, late = (batch.response_mask > 0) & (index <= 2), (batch.response_mask > 0) & (index > 2)
    torch.testing.assert_close(lp[early], (lp_plain - torch.log1p(-p_eos))[early], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[late], lp_plain[late], atol=1e-6, rtol=0)
    assert late.any() and early.sum() == 2 * len(BATCH)


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
