"""Small float64 tensors for the math tests (``test_algos``, ``test_losses``, ``test_objectives``)."""

from __future__ import annotations

import torch

GARBAGE = 1e4  # what padded positions hold in the "padding is ignored" tests (large, NaN-free)


def t(x, dtype=torch.float64) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype)


def random_mask(batch: int, length: int, gen: torch.Generator, gaps: bool = False) -> torch.Tensor:
    """Right-padded response mask, every row at least one token; optional interior gaps."""
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)
    if gaps:
        holes = torch.rand(batch, length, generator=gen) < 0.2
        holes[:, 0] = False
        mask = mask & ~holes
    return mask


def with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with ``GARBAGE`` wherever ``mask`` is zero."""
    return torch.where(mask.bool(), x, GARBAGE)
