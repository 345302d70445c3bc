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


def save_tiny_policy(path, num_layers: int = 2) -> str:
    """A random tiny Qwen2 (width 64, one head) and the embedded tokenizer saved at ``path``."""
    from learner.bootstrap import TinyModelConfig, build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=64, num_layers=num_layers, num_heads=1,
                                                        intermediate_size=128))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory) -> str:
    """The tiny policy of two layers; one torch thread, as the learners under test use."""
    torch.set_num_threads(1)
    return save_tiny_policy(tmp_path_factory.mktemp("policy"))
