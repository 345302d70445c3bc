"""The learner's configuration sections: algorithm, learner, SFT and the embedded tiny model.

Pydantic only: loading a config imports no torch. ``tests/learner/test_algos.py`` checks that every
``algorithm.name`` has an advantage estimator registered in ``learner/algos.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.section import Section


class AlgorithmConfig(Section):
    name: Literal["grpo", "drgrpo", "rloo", "reinforce", "ppo"] = Field(
        "grpo", description="grpo | drgrpo | rloo | reinforce | ppo (ppo adds a critic and uses GAE)")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman's note)")
    kl_in: Literal["none", "reward", "loss"] = Field(
        "none", description="none | reward (subtracted per token from the reward) | loss (added with kl_coef)")
    kl_coef: float = Field(0.02, ge=0, description="KL coefficient (initial value when kl_target is set)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL controller target; null = fixed coef")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL controller horizon, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="discount over response tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo)")
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip below 1")
    clip_high: float = Field(0.2, gt=0, description="PPO ratio clip above 1 (clip-higher when > clip_low)")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip bound for negative advantages; null = off")
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance weight cap for the "
                                  "sampler/learner mismatch; null = off")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="how per-token losses become one number")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    drop_uniform_groups: bool = Field(True, description="drop groups whose samples all scored the same")
    max_staleness: int = Field(0, ge=0, description="0 = on-policy; s = actors may sample up to s versions ahead")

    @model_validator(mode="after")
    def _kl(self) -> AlgorithmConfig:
        if self.kl_target is not None and self.kl_in == "none":
            raise ValueError(f"algorithm.kl_target ({self.kl_target}) steers a KL penalty, but algorithm.kl_in is "
                             "none (no penalty); set kl_in to reward or loss, or kl_target to null")
        return self


class LearnerConfig(Section):
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate of the policy")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps, then constant")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")
    minibatch_size: int = Field(512, ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(512, ge=1, description="sequences per forward/backward (gradient accumulation)")
    critic_backbone: Literal["separate", "shared"] = Field(
        "separate", description="ppo critic: separate = its own model (critic_init, critic_lr); shared = a value "
                                "head on the policy's last hidden state, trained with loss + value_coef * value loss "
                                "(less memory and time, but +4.6 points against +24.8 for separate in the README run)")
    value_coef: float = Field(0.5, ge=0, description="weight of the value loss in the joint loss "
                              "(critic_backbone=shared)")
    critic_lr: float = Field(1e-4, gt=0, description="learning rate of the critic's backbone (ppo)")
    critic_head_lr: float = Field(1e-3, gt=0, description="learning rate of the critic's value head (ppo); a zero "
                                  "head at 1e-4 had not moved off a constant after 140 steps")
    critic_init: str | None = Field(None, description="checkpoint the critic starts from (ppo): null = the policy "
                                    "with a zero head; a reward-model directory = its backbone and head (InstructGPT). "
                                    "relay pipeline sets the RM it trained")
    value_clip: float | None = Field(0.2, gt=0, description="value clipping range; null = off")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs of the learner actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the learner actor")
    torch_threads: int | None = Field(2, ge=1, description="torch intra-op threads in the learner; "
                                      "null = Ray's default (num_cpus)")
    timeout_s: float = Field(600.0, gt=0, description="timeout of one learner call, seconds")
    max_restores: int = Field(2, ge=0, description="times a dead learner is rebuilt from the last checkpoint before "
                              "the run stops (and says how to resume)")
    max_bad_steps: int = Field(3, ge=1, description="steps in a row whose loss or gradient is not finite (each is "
                               "skipped and counted) before the run stops; the last checkpoint stays intact")

    @model_validator(mode="after")
    def _batches(self) -> LearnerConfig:
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(f"learner.minibatch_size ({self.minibatch_size}) must be a multiple of "
                             f"learner.micro_batch_size ({self.micro_batch_size})")
        if self.critic_init is not None and self.critic_backbone == "shared":
            raise ValueError("learner.critic_init applies to a separate critic; with learner.critic_backbone=shared "
                             "the value head sits on the policy. Set critic_init to null or critic_backbone=separate")
        if self.critic_init is not None and not Path(self.critic_init).is_dir():
            raise ValueError(f"learner.critic_init {self.critic_init!r} is not a directory; give a reward-model or "
                             f"policy checkpoint directory, or null to start the critic from the policy")
        return self


class SFTConfig(Section):
    """Supervised fine-tuning stage. The defaults give the embedded policy a low but non-zero start."""

    steps: int = Field(300, ge=1, description="optimizer steps (one batch each)")
    batch_size: int = Field(128, ge=1, description="examples per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warmup steps from 0 to lr, then cosine decay to 0")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    schedule_steps: int | None = Field(None, ge=1, description="length of the cosine schedule; null = steps. "
                                       "Larger than steps stops SFT before the learning rate has annealed")
    seed: int = Field(0, description="seed for batch sampling")
    log_every: int = Field(50, ge=1, description="log the training loss every this many steps")


class TinyModelConfig(Section):
    """Shape of the embedded tiny Qwen2 policy."""

    hidden_size: int = Field(128, ge=1, description="residual stream width")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(
        2, ge=1, description="attention heads (and KV heads); hidden_size / num_heads must be 64 for vLLM's CPU kernel"
    )
    intermediate_size: int = Field(512, ge=1, description="SwiGLU MLP width")
    max_position_embeddings: int = Field(64, ge=8, description="longest prompt + response in tokens")
    tie_word_embeddings: bool = Field(True, description="share the input embedding and the LM head")
    seed: int = Field(0, description="seed for the weight initialisation")
