"""Tiny reward-model checkpoints for tests: a 2-layer BERT with the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from reward_service.config import default_backbone_path
from reward_service.models import RewardModel


def save_tiny_rm(path: Path, seed: int = 0, constant: float | None = None, max_length: int = 16) -> Path:
    """Random tiny RM; with ``constant`` the head is zero and its bias is ``constant``, so every text scores it."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(default_backbone_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = RewardModel(BertModel(config), tokenizer, "first", max_length)
    if constant is not None:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.fill_(constant)
    model.save_pretrained(path)
    return path
