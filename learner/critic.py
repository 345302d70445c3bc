"""The PPO critic: a scalar value head on its own backbone.

It starts from the policy checkpoint with a zero head, or, with ``learner.critic_init`` set to a
reward-model checkpoint, from that model's backbone and head: Ouyang et al. (2022) initialise the
value function from the reward model, so that V(s) starts near the score the episode will get.
A reward-model checkpoint (``reward_service.models``) is a backbone plus a Linear(hidden, 1) head,
the same shape as this critic. The critic must read the policy's token ids, so a checkpoint with
another tokenizer is refused. Trained with the clipped value loss from ``learner/algos.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from learner import algos
from learner.batch import RolloutBatch
from learner.config import AlgorithmConfig, LearnerConfig
from reward_service.models import HEAD_FILE


def _check_same_tokenizer(critic_init: str, policy_path: str) -> None:
    if not (Path(critic_init) / "config.json").is_file():
        raise ValueError(f"learner.critic_init {critic_init!r} is not a Hugging Face checkpoint directory "
                         f"(no config.json); give a reward-model or policy checkpoint, or null for the policy")
    if AutoTokenizer.from_pretrained(critic_init).get_vocab() != AutoTokenizer.from_pretrained(policy_path).get_vocab():
        raise ValueError(f"learner.critic_init {critic_init!r} has another tokenizer than the policy {policy_path!r}; "
                         f"the critic reads the policy's token ids, so it must start from a model with the same "
                         f"vocabulary (e.g. a reward model trained with reward_model.init=policy), or null")


class Critic(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, hidden_size: int, lc: LearnerConfig):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.lc = lc
        self.optimizer = torch.optim.AdamW([
            {"params": self.backbone.parameters(), "lr": lc.critic_lr},
            {"params": self.head.parameters(), "lr": lc.critic_head_lr},
        ], weight_decay=lc.weight_decay)

    @classmethod
    def build(cls, policy, policy_path: str, lc: LearnerConfig, dtype: torch.dtype) -> Critic:
        source = lc.critic_init or policy_path
        if lc.critic_init is not None:
            _check_same_tokenizer(lc.critic_init, policy_path)
        backbone = AutoModel.from_pretrained(source, dtype=dtype)
        critic = cls(backbone, backbone.config.hidden_size, lc)
        head_file = Path(source) / HEAD_FILE
        if head_file.is_file():  # a reward-model checkpoint: start from its scalar head too
            critic.head.load_state_dict(load_file(str(head_file)))
        return critic.to(policy.device)

    def forward(self, batch: RolloutBatch, device) -> torch.Tensor:
        """Values ``(B, T)`` at prediction positions: V(s_t) for the state ending at token t."""
        hidden = self.backbone(input_ids=batch.input_ids.to(device),
                               attention_mask=batch.attention_mask.to(device)).last_hidden_state
        return self.head(hidden[:, :-1].float()).squeeze(-1)

    @torch.no_grad()
    def values(self, batch: RolloutBatch, device, micro_batch_size: int) -> torch.Tensor:
        idx = torch.arange(len(batch)).split(micro_batch_size)
        return torch.cat([self(batch.select(i), device) for i in idx])

    def update(self, batch: RolloutBatch, mask, old_values, returns, alg: AlgorithmConfig) -> dict[str, float]:
        """One clipped value-loss step on a minibatch (accumulated over ``micro_batch_size`` slices).

        mask, old_values, returns: ``(B, T)``; old_values are the values the advantages were computed
        with (the clipping anchor). Returns value loss, clip fraction and the explained variance of
        ``old_values``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, clipped_sum = 0.0, 0.0
        for idx in torch.arange(len(batch)).split(self.lc.micro_batch_size):
            weight = len(idx) / len(batch)
            values = self(batch.select(idx), mask.device)
            loss, clipped = algos.value_loss(values, old_values[idx], returns[idx], mask[idx], clip=self.lc.value_clip)
            (loss * weight).backward()
            loss_sum += loss.item() * weight
            clipped_sum += float(clipped) * weight
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.lc.max_grad_norm)
        self.optimizer.step()
        return {
            "learner/value_loss": loss_sum,
            "learner/value_clip_fraction": clipped_sum,
            "learner/explained_variance": algos.explained_variance(old_values, returns, mask).item(),
        }

    def save(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(path, safe_serialization=True)
        torch.save(self.head.state_dict(), Path(path) / "value_head.pt")
