"""The PPO critic: a scalar value head on its own backbone.

It starts from the policy checkpoint with a zero head, or, with ``learner.critic_init`` set to a
reward-model checkpoint, from that model's backbone and head: Ouyang et al. (2022) initialise the
value function from the reward model, so that V(s) starts near the score the episode will get.
A reward-model checkpoint (``reward_service.models``) is a backbone plus a Linear(hidden, 1) head,
the same shape as this critic. The critic must read the policy's token ids, so a checkpoint with
another tokenizer is refused. Trained with the clipped value loss from ``learner/losses.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from learner import losses
from learner.batch import RolloutBatch
from learner.config import AlgorithmConfig, LearnerConfig
from learner.distributed import forward_pass, is_sharded
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
        self.optimizer: torch.optim.Optimizer | None = None
        if lc.gradient_checkpointing:
            backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
        critic.device = policy.device  # where it computes (its parameters may be offloaded to CPU memory)
        return critic.to(policy.device)

    def make_optimizer(self) -> None:
        """After sharding (a sharded critic's optimizer holds shards)."""
        self.optimizer = torch.optim.AdamW([
            {"params": self.backbone.parameters(), "lr": self.lc.critic_lr},
            {"params": self.head.parameters(), "lr": self.lc.critic_head_lr},
        ], weight_decay=self.lc.weight_decay)

    def forward(self, batch: RolloutBatch, device) -> torch.Tensor:
        """Values ``(B, T)`` at prediction positions: V(s_t) for the state ending at token t."""
        with forward_pass(self.lc, device, batch.input_ids.shape[1]):
            hidden = self.backbone(input_ids=batch.input_ids.to(device),
                                   attention_mask=batch.attention_mask.to(device)).last_hidden_state
        return self.head(hidden[:, :-1].float()).squeeze(-1)

    @torch.no_grad()
    def values(self, batch: RolloutBatch, device, plan=None, dummy=None) -> torch.Tensor:
        """V ``(B, T)`` of every row, over the learner's micro-batch ``plan`` (default: one pass over all rows;
        ``dummy`` fills a rank's empty ones)."""
        out = torch.zeros(batch.response_mask.shape, device=device)
        for idx in plan(batch, torch.arange(len(batch))) if plan else [torch.arange(len(batch))]:
            v = self(batch.select(idx) if len(idx) else dummy(), device)
            if len(idx):
                out[idx, : v.shape[1]] = v
        return out

    def update(self, batch: RolloutBatch, micro: list[torch.Tensor], norm: dict[str, float], alg: AlgorithmConfig,
               dist, dummy) -> dict[str, float]:
        """One clipped value-loss step on a minibatch, accumulated over the learner's micro-batches ``micro``
        (rows of ``batch``, whose ``values`` are the clipping anchor and ``returns`` the targets). The loss is the
        token mean over the minibatch on all ranks (``norm``, from the learner), gradients summed over ranks
        (``dist``) unless sharded. Returns this rank's share of the value loss and clip fraction."""
        self.optimizer.zero_grad(set_to_none=True)
        self.train()  # gradient checkpointing acts in train mode only
        loss_sum, clipped_sum = 0.0, 0.0
        device = self.device
        for idx in micro:
            part = batch.select(idx) if len(idx) else dummy()
            mask = part.response_mask.to(device)
            weight = float(mask.sum()) / norm["value_tokens"]
            values = self(part, device)
            loss, clipped = losses.value_loss(values, part.values.to(device), part.returns.to(device), mask,
                                              clip=self.lc.value_clip)
            (loss * weight * norm.get("scale", 1.0)).backward()
            loss_sum += loss.item() * weight
            clipped_sum += float(clipped) * len(idx) / norm["rows"]
        params = list(self.parameters())
        if not is_sharded(self):
            dist.sum_grads(params)
        self.eval()
        torch.nn.utils.clip_grad_norm_(params, self.lc.max_grad_norm)
        self.optimizer.step()
        return {"learner/value_loss": loss_sum, "learner/value_clip_fraction": clipped_sum}

    def save(self, path: str, state: dict[str, torch.Tensor]) -> None:
        """``state``: the whole critic's (``learner.distributed.full_state``); the backbone in Hugging Face format."""
        Path(path).mkdir(parents=True, exist_ok=True)
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        self.backbone.save_pretrained(path, state_dict=backbone, safe_serialization=True)
        torch.save({k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")},
                   Path(path) / "value_head.pt")
