"""The shared-prompt forward (``learner/shared_prompt.py``) against one pass over each full row.

Prompts of different lengths and responses of different lengths, so the padding gap between a short
prompt and its response, and response padding, are both exercised. Logprobs, entropy and the shared
value head must agree at every response position, and a whole update must move the weights as the
full-row update does.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest
import torch

from cluster.config import load_config
from core.records import Rollout, ScoredRollout
from learner import shared_prompt
from learner.batch import collate, token_budget_split
from learner.bootstrap import build_tokenizer
from learner.learner import Learner

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
BASE = ["learner.lr=1e-3", "learner.warmup_steps=0", "learner.torch_threads=1"]


def _rollouts(seed: int = 3) -> list[ScoredRollout]:
    """Four prompts of 3 to 9 tokens, 1 to 4 samples each, responses of 1 to 6 tokens; groups interleaved in
    the list, so the shared pass has to find them."""
    tokenizer = build_tokenizer()
    rng = random.Random(seed)
    prompts = ["7+5=", "12+345=", "1+2+3+4=", "9="]
    rows = []
    for g, prompt in enumerate(prompts):
        for _ in range(g + 1):
            text = "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 5)))
            ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
            rows.append(ScoredRollout(Rollout(group_id=g, prompt_ids=tokenizer.encode(prompt, add_special_tokens=False),
                                              response_ids=ids, sampling_logprobs=[-math.log(258)] * len(ids),
                                              policy_version=0, finish_reason="stop", prompt_text=prompt,
                                              response_text=text, metadata={}), rng.random()))
    rng.shuffle(rows)
    return rows


ROWS = _rollouts()


def _learner(policy_dir: str, share: bool, overrides: list[str] = (), **kwargs) -> Learner:
    cfg = load_config(None, [*BASE, f"learner.share_prompts={str(share).lower()}", *overrides])
    return Learner(policy_dir, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                   cfg.generation.max_tokens, **kwargs)


def _gradients(learner: Learner) -> list[torch.Tensor]:
    """Filled with the trainable parameters' gradients at each optimizer step (Adam's first step is about
    lr * sign(g), so weights after it would hide how close the gradients are)."""
    out, step = [], learner.optimizer.step

    def record(*args, **kwargs):
        out.extend(p.grad.detach().clone() for p in learner.trainable)
        return step(*args, **kwargs)

    learner.optimizer.step = record
    return out


def _assert_same_gradients(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want) > 0
    scale = max(g.abs().max().item() for g in want)
    assert scale > 1e-3  # the step learns something
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)


LORA_KL = ["learner.lora.r=4", "learner.lora.alpha=8", "algorithm.kl_in=loss", "algorithm.kl_coef=0.1"]
"""LoRA with the KL in the loss: every step also runs the reference pass, the base with its adapters off"""


def _assert_same_reference_passes(got: Learner, want: Learner, batch) -> None:
    """The no-grad pass with the adapters on and off (the policy and its LoRA reference) agree at every response
    position."""
    mask = batch.response_mask.bool()
    for adapters_off in (False, True):
        a = want._no_grad_pass(want.policy, batch, adapters_off=adapters_off)[0]
        b = got._no_grad_pass(got.policy, batch, adapters_off=adapters_off)[0]
        torch.testing.assert_close(b[mask], a[mask], atol=1e-5, rtol=0)


def _assert_layers_compiled(learner: Learner) -> None:
    layers = [m for m in learner.policy.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert len(layers) == 2 and all(m._compiled_call_impl is not None for m in layers)


def test_split_prompts_finds_each_distinct_prompt():
    batch = collate(ROWS, 0)
    split = shared_prompt.split_prompts(batch)
    assert len(split.unique) == 4 and len(split.inverse) == len(ROWS) == 10
    for row, r in enumerate(ROWS):  # each row maps to a row with its own prompt
        assert ROWS[int(split.unique[split.inverse[row]])].rollout.prompt_ids == r.rollout.prompt_ids
        assert int(split.prompt_len[row]) == len(r.rollout.prompt_ids)
        assert int(split.response_len[row]) == len(r.rollout.response_ids)
    one_each = [next(r for r in ROWS if r.rollout.group_id == g) for g in range(4)]
    assert shared_prompt.split_prompts(collate(one_each, 0)) is None  # nothing to share: the plain pass


def test_to_positions_by_hand():
    # row 0: prompt 3, response 2 -> positions 2, 3; row 1: prompt 1, response 3 -> positions 0, 1, 2
    split = shared_prompt.PromptSplit(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([3, 1]),
                                      torch.tensor([2, 3]))
    out = shared_prompt.to_positions(torch.tensor([[1.0, 2.0, 9.0], [4.0, 5.0, 6.0]]), split, width=5)
    assert out.tolist() == [[0, 0, 1, 2, 0], [4, 5, 6, 0, 0]]


def test_groups_stay_together_in_micro_batches():
    lengths = torch.tensor([5, 9, 6, 8, 7, 4])
    groups = torch.tensor([0, 1, 0, 1, 2, 2])
    # groups by their longest row (1: 9, 2: 7, 0: 6), longest row first within a group
    micro = token_budget_split(lengths, torch.arange(6), budget=100, groups=groups)
    assert [m.tolist() for m in micro] == [[1, 3, 4, 5, 2, 0]]
    micro = token_budget_split(lengths, torch.arange(6), budget=18, groups=groups)  # 2 x 9, 2 x 7, 2 x 6
    assert [m.tolist() for m in micro] == [[1, 3], [4, 5], [2, 0]]


def test_response_buckets_by_hand(monkeypatch):
    monkeypatch.setattr(shared_prompt, "MIN_BUCKET_ROWS", 2)
    # sorted: rows 1, 4 (length 1), 0 (2), 3 (5), 2 (6). [1, 4] with row 0 would pad 3 x 2 = 6 > 1.1 x 4: it
    # closes. [0] has fewer than 2 rows, so row 3 joins it; [0, 3] with row 2 would pad 3 x 6 = 18 > 1.1 x 13.
    assert shared_prompt.response_buckets([2, 1, 6, 5, 1]) == [[1, 4], [0, 3], [2]]
    monkeypatch.setattr(shared_prompt, "MIN_BUCKET_ROWS", 32)
    assert shared_prompt.response_buckets([2, 1, 6, 5, 1]) == [[1, 4, 0, 3, 2]]  # too few rows to split


@pytest.fixture(params=[32, 2], ids=["one-bucket", "buckets"])
def bucket_rows(request, monkeypatch):
    """Pass 2 in one call (the default at this batch size) or in buckets by response length."""
    monkeypatch.setattr(shared_prompt, "MIN_BUCKET_ROWS", request.param)
    return request.param


@pytest.mark.parametrize("extra", [[], ["algorithm.name=ppo", "learner.critic_backbone=shared",
                                        "algorithm.kl_in=reward", "algorithm.kl_coef=0.05"]],
                         ids=["grpo", "ppo-shared-head"])
def test_shared_pass_equals_the_full_rows(extra, policy_dir, bucket_rows):
    """Logprobs, entropy and values at the response positions, then one update (which takes its old logprobs,
    the reference's and the values from the same passes): the same within float rounding."""
    full, shared = _learner(policy_dir, False, extra), _learner(policy_dir, True, extra)
    assert shared.share_prompts and not full.share_prompts
    batch = collate(ROWS, 0)
    mask = batch.response_mask.bool()
    with_values = shared.value_head is not None
    if with_values:
        shared.value_head.load_state_dict(full.value_head.state_dict())
    with torch.no_grad():
        a = full._token_logprobs(full.policy, batch, with_entropy=True, with_values=with_values)
        b = shared._token_logprobs(shared.policy, batch, with_entropy=True, with_values=with_values)
    for x, y in zip(a, b, strict=True):
        if x is not None:
            torch.testing.assert_close(y[mask], x[mask], atol=1e-5, rtol=0)
    assert (b[0][~mask] == 0).all()  # off the response: 0, which every caller masks
    grads_full, grads_shared = _gradients(full), _gradients(shared)
    stats_full, stats_shared = full.train_step(ROWS), shared.train_step(ROWS)
    _assert_same_gradients(grads_shared, grads_full)
    for key in ("learner/policy_loss", "learner/entropy", "learner/grad_norm"):
        assert stats_shared[key] == pytest.approx(stats_full[key], rel=1e-4, abs=1e-6), key


def test_shared_pass_with_lora_and_min_tokens(policy_dir, bucket_rows):
    """LoRA (the reference is the base with adapters off, through the same two passes) and the sampler's
    min_tokens mask (on the response-aligned logits)."""
    full, shared = (_learner(policy_dir, share, LORA_KL, seed=0, min_tokens=2) for share in (False, True))
    rows = [r for r in ROWS if len(r.rollout.response_ids) > 2]  # a stop token before min_tokens is impossible
    batch = collate(rows, 0)
    assert shared_prompt.split_prompts(batch) is not None
    _assert_same_reference_passes(shared, full, batch)
    grads_full, grads_shared = _gradients(full), _gradients(shared)
    full.train_step(rows)
    shared.train_step(rows)
    _assert_same_gradients(grads_shared, grads_full)


def test_attention_kernel_math_for_short_rows_on_cpu():
    """On CPU the math kernel up to ``CPU_MATH_ATTENTION_MAX`` tokens, PyTorch's flash kernel above; the backward
    pass follows the forward's choice."""
    import torch.nn.functional as F

    from learner.distributed import CPU_MATH_ATTENTION_MAX, attention_kernel

    def backward_of(width: int) -> str:
        q = torch.randn(2, 2, width, 8, requires_grad=True)
        with attention_kernel(torch.device("cpu"), width):
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return type(out.grad_fn).__name__

    assert "Flash" not in backward_of(CPU_MATH_ATTENTION_MAX)
    assert "Flash" in backward_of(CPU_MATH_ATTENTION_MAX + 1)


def test_forward_pass_takes_a_device_or_its_name():
    """The critic's forward is called with the device or its name; in mixed precision both give bf16 autocast
    and the math kernel for short rows."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from learner.distributed import forward_pass

    lc = SimpleNamespace(mixed_precision="bf16", gradient_checkpointing=False)
    for device in ("cpu", torch.device("cpu")):
        q = torch.randn(2, 2, 16, 8, requires_grad=True)
        with forward_pass(lc, device, 16):
            assert torch.is_autocast_enabled("cpu")
            out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        assert "Flash" not in type(out.grad_fn).__name__


def test_update_is_the_same_under_either_attention_kernel(policy_dir, monkeypatch):
    """The math kernel the learner picks for these short rows against PyTorch's flash kernel: the same logprobs
    and gradients within float rounding."""
    from learner import distributed

    math_kernel, flash_kernel = _learner(policy_dir, True), _learner(policy_dir, True)
    batch = collate(ROWS, 0)
    mask = batch.response_mask.bool()
    grads_math, grads_flash = _gradients(math_kernel), _gradients(flash_kernel)
    with torch.no_grad():
        a = math_kernel._token_logprobs(math_kernel.policy, batch)[0]
    math_kernel.train_step(ROWS)
    monkeypatch.setattr(distributed, "CPU_MATH_ATTENTION_MAX", 0)
    with torch.no_grad():
        b = flash_kernel._token_logprobs(flash_kernel.policy, batch)[0]
    flash_kernel.train_step(ROWS)
    torch.testing.assert_close(a[mask], b[mask], atol=1e-5, rtol=0)
    _assert_same_gradients(grads_math, grads_flash)


def test_compiled_layers_give_the_eager_update(policy_dir):
    """learner.compile: every decoder layer compiled (and the one-pass forward), then two updates over batches of
    different widths: the same gradients and statistics as the eager learner, from one graph for both layers and
    one recompile at the second, wider one (a key-value cache in the forward made each layer recompile on its state)."""
    from torch._dynamo.utils import counters

    eager, compiled = _learner(policy_dir, False), _learner(policy_dir, True, ["learner.compile=true"])
    graphs_before = counters["stats"]["unique_graphs"]
    assert not compiled.share_prompts  # compile keeps the one-pass forward
    _assert_layers_compiled(compiled)
    grads_eager, grads_compiled = _gradients(eager), _gradients(compiled)
    wider = _rollouts(seed=11) + [ScoredRollout(replace(ROWS[0].rollout, response_ids=[5] * 12,
                                                                sampling_logprobs=[-math.log(258)] * 12), 0.5)]
    for rows, graphs in ((ROWS, 1), (wider, 2)):
        stats_eager, stats_compiled = eager.train_step(rows), compiled.train_step(rows)
        for key in ("learner/policy_loss", "learner/entropy", "learner/grad_norm"):
            assert stats_compiled[key] == pytest.approx(stats_eager[key], rel=1e-4, abs=1e-6), key
        assert counters["stats"]["unique_graphs"] - graphs_before == graphs
    _assert_same_gradients(grads_compiled, grads_eager)


def test_compile_names_a_model_without_marked_layers():
    from learner.distributed import compile_blocks

    with pytest.raises(ValueError, match="learner.compile=false"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_compiled_layers_with_lora_give_the_eager_update(policy_dir):
    """learner.compile with LoRA (peft's adapters inside the compiled layers) and the KL in the loss, so every
    step also runs the reference pass with the adapters off: the same reference logprobs, gradients and
    statistics as the eager LoRA learner, and the merged weights it publishes match too."""
    eager = _learner(policy_dir, False, LORA_KL)
    compiled = _learner(policy_dir, False, [*LORA_KL, "learner.compile=true"])
    _assert_layers_compiled(compiled)
    _assert_same_reference_passes(compiled, eager, collate(ROWS, 0))
    grads_eager, grads_compiled = _gradients(eager), _gradients(compiled)
    for _ in range(2):  # the second step's adapters are non-zero, so adapters on and off differ
        stats_eager, stats_compiled = eager.train_step(ROWS), compiled.train_step(ROWS)
        for key in ("learner/policy_loss", "learner/entropy", "learner/grad_norm", "learner/kl"):
            assert stats_compiled[key] == pytest.approx(stats_eager[key], rel=1e-4, abs=1e-6), key
    _assert_same_gradients(grads_compiled, grads_eager)
    published_eager, published_compiled = dict(eager._named_weights()), dict(compiled._named_weights())
    assert published_compiled.keys() == published_eager.keys()
    for name, tensor in published_eager.items():
        torch.testing.assert_close(published_compiled[name], tensor, atol=1e-6, rtol=1e-5, msg=name)
