"""Shared fixtures of the learner tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def float64():
    """float64 for exact comparisons against hand/loop results; restored for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
