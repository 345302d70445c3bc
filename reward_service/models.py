"""Scalar-head reward models around a Hugging Face backbone.

``RewardModel`` = ``AutoModel`` backbone + ``Linear(hidden, 1)`` head. The head reads one vector
per sequence: the last non-padding token for causal LMs (the only position that has seen the whole
text), the first token ([CLS]) or the masked mean for encoders.

A checkpoint is a plain Hugging Face directory (backbone config + weights + tokenizer) plus
``reward_head.safetensors`` and ``reward_model.json`` (pooling, max_length), so ``from_pretrained(path)``
in a Serve replica rebuilds exactly what training saved.

Text is ``prompt + response`` as one sequence, truncated on the right to ``max_length`` tokens;
simplification: no chat template, which the embedded arithmetic task does not need.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


def default_pooling(config: PretrainedConfig) -> str:
    """"last" for causal (decoder-only) architectures, "first" for encoders."""
    archs = config.architectures or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in archs):
        return "last"
    return "first"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence.

    hidden: (B, T, H); attention_mask: (B, T) with 1 on real tokens. Returns (B, H).
    ``last`` works for left or right padding: it takes the highest position whose mask is 1.
    """
    if pooling == "first":
        return hidden[:, 0]
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling == "last":
        positions = torch.arange(hidden.shape[1], device=hidden.device)  # (T,)
        last = (attention_mask * positions).argmax(-1)  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; valid: ['first', 'last', 'mean']")


class RewardModel(nn.Module):
    """Backbone + scalar head: ``forward(input_ids (B, T), attention_mask (B, T)) -> rewards (B,)``."""

    def __init__(self, backbone: nn.Module, tokenizer: PreTrainedTokenizerBase, pooling: str, max_length: int):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.max_length = max_length
        self.head = nn.Linear(backbone.config.hidden_size, 1)

    @classmethod
    def from_backbone(cls, path: str | Path, pooling: str | None = None, max_length: int = 128) -> RewardModel:
        """A fresh reward model (new head, zero-mean small init) on a pretrained backbone."""
        backbone, tokenizer = _load_backbone(path)
        model = cls(backbone, tokenizer, pooling or default_pooling(backbone.config), max_length)
        nn.init.normal_(model.head.weight, std=0.02)
        nn.init.zeros_(model.head.bias)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path, pooling: str | None = None,
                        max_length: int | None = None) -> RewardModel:
        """Load a checkpoint written by ``save_pretrained``; arguments override its saved settings."""
        path = Path(path)
        if not (path / HEAD_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a reward-model checkpoint: {HEAD_FILE} is missing")
        meta = json.loads((path / META_FILE).read_text())
        backbone, tokenizer = _load_backbone(path)
        model = cls(backbone, tokenizer, pooling or meta["pooling"], max_length or meta["max_length"])
        model.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        return model

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(path / HEAD_FILE))
        (path / META_FILE).write_text(json.dumps({"pooling": self.pooling, "max_length": self.max_length}))

    def encode(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        """Tokenise ``texts``; returns the padded batch ((B, T) tensors) and how many were truncated."""
        lengths = [len(ids) for ids in self.tokenizer(texts)["input_ids"]]
        truncated = sum(n > self.max_length for n in lengths)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, truncated

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.head(pool(hidden, attention_mask, self.pooling)).squeeze(-1)  # (B,)

    @torch.inference_mode()
    def score(self, texts: list[str]) -> tuple[list[float], int]:
        """Rewards for ``texts`` (B,) and the number truncated."""
        batch, truncated = self.encode(texts)
        device = self.head.weight.device
        return self(**{k: v.to(device) for k, v in batch.items()}).float().tolist(), truncated


def _load_backbone(path: str | Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local directories; never reach the hub
    path = str(path)
    config = AutoConfig.from_pretrained(path)
    backbone = AutoModel.from_pretrained(path, config=config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # causal tokenizers often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return backbone, tokenizer


def ensemble_reward(values: Sequence[float], penalty: float) -> tuple[float, float, float]:
    """One text's ensemble reward from its K model scores: (mean - penalty * std, mean, std), std the population
    std (ddof=0), so two models scoring a and b give mean (a+b)/2 and std |a-b|/2. A NaN score makes all NaN."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return mean - penalty * std, mean, std


def join_text(prompt: str, response: str) -> str:
    """The sequence a reward model reads for one sample."""
    return prompt + response
