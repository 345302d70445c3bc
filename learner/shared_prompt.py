"""One forward pass per distinct prompt: the samples of a group share their prompt's keys and values.

GRPO draws several responses per prompt, and a plain forward pass over each prompt + response row
computes the prompt once per sample. Here a micro-batch's distinct prompts go through the model
once (pass 1, caching their keys and values), the cache is gathered out to the rows that share
each prompt, and every row's response tokens go through the model on top of it (pass 2). The
attention of a response token sees exactly the keys and values it would see in the full row, so
the logprobs are the plain pass's up to float rounding, and autograd sums the gradients of the
rows that share a prompt into that prompt's activations. This is the shared-prefix forward of
Prefix Grouper (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through Shared-Prefix
Forward"), written here on Hugging Face's key-value cache.

Layout: prompts are right-padded in pass 1 (every row starts with a real token, so no attention
row is fully masked); pass 2 puts the responses after the longest prompt, masks the gap, and gives
each response token its true position id. The outputs come back response-aligned, ``(B, R, .)``:
column j is the prediction of response token j (column 0 from the prompt's last position), and
``to_positions`` moves a ``(B, R)`` tensor to the batch's ``(B, T)`` prediction positions.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from learner.batch import RolloutBatch


@dataclass
class PromptSplit:
    unique: torch.Tensor  # (G,) one row holding each distinct prompt
    inverse: torch.Tensor  # (B,) the distinct prompt (index into unique) of each row
    prompt_len: torch.Tensor  # (B,) prompt tokens of each row
    response_len: torch.Tensor  # (B,) response tokens of each row


def split_prompts(batch: RolloutBatch) -> PromptSplit | None:
    """The distinct prompts of ``batch`` (right-padded rows of prompt + response), or None when no two rows
    share one (then a shared pass would save nothing)."""
    response_len = batch.response_mask.sum(1).long()
    prompt_len = batch.lengths().long() - response_len
    index: dict[tuple[int, ...], int] = {}
    inverse, unique = [], []
    for row, (ids, n) in enumerate(zip(batch.input_ids.tolist(), prompt_len.tolist(), strict=True)):
        key = tuple(ids[:n])
        if key not in index:
            index[key] = len(unique)
            unique.append(row)
        inverse.append(index[key])
    if len(unique) == len(inverse):
        return None
    return PromptSplit(torch.tensor(unique), torch.tensor(inverse), prompt_len, response_len)


MIN_BUCKET_ROWS = 32
"""pass 2 runs in buckets of rows of similar response length, each at least this many rows (fewer, larger
calls against less padding)"""


def response_buckets(lengths: list[int], slack: float = 1.1) -> list[list[int]]:
    """Rows (indices into ``lengths``) in buckets of similar length, shortest first: a bucket closes before the
    row that would make its padded tokens (rows x longest) exceed ``slack`` x its real tokens, once it holds
    ``MIN_BUCKET_ROWS`` rows."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets: list[list[int]] = [[]]
    real = 0
    for row in order:
        bucket = buckets[-1]
        if len(bucket) >= MIN_BUCKET_ROWS and (len(bucket) + 1) * lengths[row] > slack * (real + lengths[row]):
            buckets.append([])
            bucket, real = buckets[-1], 0
        bucket.append(row)
        real += lengths[row]
    return buckets


def _gathered(cache, rows: torch.Tensor):
    """A copy of ``cache`` holding ``rows`` of it (the original is left as it is for the other buckets)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.batch_select_indices(rows)  # reassigns each copied layer's tensors: a differentiable gather
    return out


def forward(model, batch: RolloutBatch, split: PromptSplit, device, with_hidden: bool = False):
    """The two passes. Returns response-aligned ``logits (B, R, V)``, the response token ids ``(B, R)``,
    their mask ``(B, R)`` and, if asked, the last hidden state at the same positions ``(B, R, H)``."""
    ids = batch.input_ids.to(device)
    width = ids.shape[1]
    prompt_len, response_len = split.prompt_len.to(device), split.response_len.to(device)
    unique, inverse = split.unique.to(device), split.inverse.to(device)
    longest_prompt = int(prompt_len[unique].max())
    longest = max(int(response_len.max()), 1)

    prompt_mask = (torch.arange(longest_prompt, device=device) < prompt_len[unique, None]).long()
    prompt_ids = ids[unique, :longest_prompt] * prompt_mask
    first = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, output_hidden_states=with_hidden)

    steps = torch.arange(longest, device=device)
    response_mask = (steps < response_len[:, None]).long()
    columns = prompt_len[:, None] + steps  # where response token j sits in the full row
    response_ids = torch.gather(ids, 1, columns.clamp(max=width - 1)) * response_mask
    # Pass 2 by buckets of similar response length, each padded to its own longest: column j >= 1 of a row is
    # predicted at its response token j - 1; every bucket's outputs are padded to the longest and put back in order.
    logits, hidden, order = [], [], []
    for bucket in response_buckets(split.response_len.tolist()):
        rows = torch.tensor(bucket, device=device)
        n = max(int(response_len[rows].max()), 1)
        out = model(input_ids=response_ids[rows, :n], position_ids=columns[rows, :n].clamp(max=width - 1),
                    attention_mask=torch.cat([prompt_mask[inverse[rows]], response_mask[rows, :n]], 1),
                    past_key_values=_gathered(first.past_key_values, inverse[rows]), use_cache=False,
                    output_hidden_states=with_hidden)
        pad = (0, 0, 0, longest - n)
        logits.append(F.pad(out.logits[:, :-1], pad))
        if with_hidden:
            hidden.append(F.pad(out.hidden_states[-1][:, :-1], pad))
        order.append(rows)
    back = torch.argsort(torch.cat(order))  # bucket order -> row order

    last = torch.arange(len(unique), device=device), prompt_len[unique] - 1  # each prompt's last token
    logits = torch.cat([first.logits[last][inverse].unsqueeze(1), torch.cat(logits)[back]], 1)
    if with_hidden:
        hidden = torch.cat([first.hidden_states[-1][last][inverse].unsqueeze(1), torch.cat(hidden)[back]], 1)
    return logits, response_ids, response_mask, hidden if with_hidden else None


def to_positions(values: torch.Tensor, split: PromptSplit, width: int) -> torch.Tensor:
    """A response-aligned ``(B, R)`` tensor at the batch's prediction positions ``(B, width)``: response token
    j of a row with p prompt tokens is predicted at position p - 1 + j. Elsewhere 0 (callers mask there)."""
    rows, longest = values.shape
    device = values.device
    steps = torch.arange(longest, device=device)
    valid = steps < split.response_len.to(device)[:, None]
    out = values.new_zeros(rows, width + longest)  # room for the padding columns' targets, cut below
    out.scatter_(1, split.prompt_len.to(device)[:, None] - 1 + steps, values * valid)
    return out[:, :width]
