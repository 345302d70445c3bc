"""The PPO critic: a scalar value head on its own copy of the policy's backbone.

Initialised from the policy checkpoint (as in Ouyang et al. 2022, where the value model
starts from the reward model or the policy); trained with the clipped value loss from
``learner/algos.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel

from cluster.config import AlgorithmConfig, LearnerConfig
from learner import algos
from learner.batch import RolloutBatch


class Critic(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, hidden_size: int, lc: LearnerConfig):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.lc = lc
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lc.critic_lr, weight_decay=lc.weight_decay)

    @classmethod
    def build(cls, policy, policy_path: str, lc: LearnerConfig, dtype: torch.dtype) -> Critic:
        backbone = AutoModel.from_pretrained(policy_path, dtype=dtype)
        return cls(backbone, policy.config.hidden_size, lc).to(policy.device)

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
