"""Supervised fine-tuning of a causal LM on (prompt, completion) pairs, and greedy evaluation.

Used twice: to warm-start the embedded tiny policy (``learner/bootstrap.py``) and by the
pipeline's SFT stage on any Hugging Face causal-LM checkpoint.

Simplifications, on purpose:
- The whole example set is tokenised once into one right-padded tensor; batches are drawn
  by index with replacement from a seeded generator. Fine for the small synthetic tasks
  this runs on; a streaming dataset would be needed for corpora that do not fit in memory.
- Prompts are tokenised without special tokens; the completion is followed by EOS, and the
  loss covers only completion tokens and that EOS (prompt and padding labels are -100).
- One process, no gradient accumulation, no mixed precision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.data import exact_match
from learner.config import SFTConfig

IGNORE_INDEX = -100




def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels``, each ``(N, T)``.

    ``labels`` is -100 on prompt and padding positions, the token id on completion tokens and
    the final EOS (unshifted: position t is the token the model must emit at t).
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None or pad is None:
        raise ValueError("the tokenizer needs eos_token and pad_token set for SFT")
    rows: list[tuple[list[int], list[int]]] = []
    for prompt, completion in examples:
        p = tokenizer.encode(prompt, add_special_tokens=False)
        c = tokenizer.encode(completion, add_special_tokens=False) + [eos]
        rows.append((p + c, [IGNORE_INDEX] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy over labelled positions.

    logits: ``(B, T, V)``; labels: ``(B, T)`` with -100 where no loss is taken.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return F.cross_entropy(shifted_logits.float(), shifted_labels, ignore_index=IGNORE_INDEX)


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear 0->1 over ``warmup_steps``, then cosine 1->0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[tuple[str, str]],
    cfg: SFTConfig,
    log: Callable[[str], object] = print,
) -> dict[str, float | list[float]]:
    """Fine-tune ``model`` in place on (prompt, completion) pairs; loss on completion + EOS only.

    Returns ``sft/first_loss``, ``sft/final_loss`` (mean of the last 10 steps), ``sft/losses``
    (one per step), ``sft/seconds`` and ``sft/steps``.
    """
    if not examples:
        raise ValueError("train_sft needs at least one example")
    input_ids, attention_mask, labels = encode_examples(tokenizer, examples)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, cfg.warmup_steps, cfg.schedule_steps or cfg.steps)
    )
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen)
        batch_mask = attention_mask[idx]
        width = int(batch_mask.sum(1).max())  # trim the batch's common right padding
        logits = model(
            input_ids=input_ids[idx, :width].to(device), attention_mask=batch_mask[:, :width].to(device)
        ).logits  # (B, T, V)
        loss = completion_loss(logits, labels[idx, :width].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log(f"sft step {step + 1}/{cfg.steps} loss {losses[-1]:.4f} lr {schedule.get_last_lr()[0]:.2e}")
    model.eval()
    return {
        "sft/first_loss": losses[0],
        "sft/final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "sft/losses": losses,
        "sft/seconds": time.perf_counter() - start,
        "sft/steps": float(cfg.steps),
    }


def greedy_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (special tokens dropped) for ``prompts``, left-padded in batches."""
    return _generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature=None)


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    k: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 512,
) -> list[list[str]]:
    """``k`` sampled completions per prompt (pure temperature sampling, no top-k/top-p), as ``[prompt][k]``."""
    torch.manual_seed(seed)
    flat = _generate(model, tokenizer, [p for p in prompts for _ in range(k)], max_new_tokens, batch_size, temperature)
    return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]


@torch.no_grad()
def _generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
              temperature: float | None) -> list[str]:
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sampling = {"do_sample": False} if temperature is None else {"do_sample": True, "temperature": temperature,
                                                                 "top_k": 0, "top_p": 1.0}
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[i : i + batch_size]), add_special_tokens=False, padding=True, return_tensors="pt"
            ).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )  # (B, T_prompt + <=max_new_tokens)
            out.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return out


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 256,
) -> float:
    """Fraction of (prompt, completion) ``pairs`` whose greedy response is exactly the completion
    (``core.data.exact_match``): SFT's own yardstick; RL's held-out score uses the configured reward."""
    if not pairs:
        raise ValueError("greedy_accuracy needs at least one (prompt, completion) pair")
    # Room for the longest completion, its EOS, and one token more so a run-on answer is scored wrong.
    max_new = max(len(tokenizer.encode(c, add_special_tokens=False)) for _, c in pairs) + 2
    responses = greedy_responses(model, tokenizer, [p for p, _ in pairs], max_new, batch_size)
    return sum(exact_match(r, c) for r, (_, c) in zip(responses, pairs, strict=True)) / len(pairs)
