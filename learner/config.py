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
    name: Literal["grpo", "drgrpo", "rloo", "reinforce", "reinforce_pp", "reinforce_pp_baseline", "ppo", "rwr"] = Field(
        "grpo", description="advantage estimator: grpo (Shao et al. 2024) | drgrpo (Dr.GRPO, Liu et al. 2025) | rloo "
                            "(Ahmadian et al. 2024) | reinforce (batch-whitened, per-position baseline) | reinforce_pp "
                            "(REINFORCE++, Hu et al. 2025: returns-to-go of the per-token rewards, whitened over the "
                            "whole batch; reads gamma, kl_in=reward) | reinforce_pp_baseline (REINFORCE++ with the "
                            "group-mean baseline, then whitened over the batch) | ppo (adds a critic and uses GAE) | "
                            "rwr (reward-weighted regression, Peters & Schaal 2007: weights exp(z / rwr_beta), z = "
                            "reward whitened over the batch, normalised to mean 1; trained with policy_loss nll: no "
                            "ratio, no clip)")
    rwr_beta: float = Field(1.0, gt=0, description="rwr: temperature of the weights exp(z / rwr_beta)")
    rwr_whiten: bool = Field(True, description="rwr: z = reward whitened over the batch; false = the raw reward "
                             "(exp(r / rwr_beta), normalised)")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman's note)")
    kl_in: Literal["none", "reward", "loss"] = Field(
        "none", description="none | reward (subtracted per token from the reward) | loss (added with kl_coef)")
    kl_coef: float = Field(0.02, ge=0, description="KL coefficient (initial value when kl_target is set)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL controller target; null = fixed coef")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL controller horizon, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="discount over response tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo)")
    clip_low: float = Field(0.2, gt=0, lt=1, description="ratio clip below 1 (ppo and gspo: the surrogate's; cispo: "
                            "the IS weight's)")
    clip_high: float = Field(0.2, gt=0, description="ratio clip above 1 (clip-higher, DAPO, when > clip_low)")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip bound for negative advantages; null = off")
    policy_loss: Literal["ppo", "gspo", "gspo_token", "cispo", "nll"] | None = Field(
        None, description="null = ppo, or nll with name rwr | nll: weighted log-likelihood -A log pi, no ratio or "
                           "clip (what rwr trains with) | ppo: clipped token surrogate (Schulman et al. 2017; reads "
                           "clip_low, clip_high, dual_clip) | gspo: one length-normalised ratio per sequence, "
                           "clipped per sequence (GSPO, "
                           "Zheng et al. 2025; the paper uses clip_low 3e-4, clip_high 4e-4 and loss_agg "
                           "seq-mean-token-mean) | gspo_token: GSPO-token, the same ratio with per-token advantages | "
                           "cispo: REINFORCE with the IS ratio clipped to [1-clip_low, 1+clip_high] and detached, so "
                           "no token loses its gradient (CISPO, MiniMax-M1 2025; token-mean)")
    rollout_correction: Literal["none", "tis", "seq_tis", "masked_is"] = Field(
        "tis", description="correction for the sampler/learner mismatch, ratio = pi_old / pi_sampler: none | tis: "
                           "token weight min(ratio, tis_cap) (TIS, Yao et al. 2025) | seq_tis: one weight per "
                           "sequence, min(product of ratios, tis_cap) | masked_is: tokens whose ratio is outside "
                           "[is_low, is_high] leave the loss, the others keep the ratio as weight (IcePop, Ling Team "
                           "2025)")
    tis_cap: float | None = Field(2.0, gt=0, description="cap on the importance weight of rollout_correction tis and "
                                  "seq_tis; null only with rollout_correction none or masked_is")
    is_low: float = Field(0.5, gt=0, lt=1, description="masked_is: lower end of the accepted ratio band (below 1, "
                          "so the band always holds ratio 1)")
    is_high: float = Field(2.0, gt=1, description="masked_is: upper end of the accepted ratio band (IcePop used 5)")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="how per-token losses become one number: token-mean (DAPO, CISPO) | "
                                  "seq-mean-token-mean (GRPO, GSPO) | seq-mean-token-sum | seq-mean-token-sum-norm "
                                  "(Dr.GRPO: token sum / max_tokens)")
    reward_baseline: Literal["none", "batch", "group"] = Field(
        "none", description="baseline taken off each sequence reward before KL shaping and the estimator: none | "
                            "batch (whitened over the batch) | group (minus the leave-one-out mean of the prompt's "
                            "other samples, RLOO's baseline; for ppo the critic then learns only what differs within "
                            "a group)")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    drop_uniform_groups: bool = Field(True, description="drop groups whose samples all scored the same")
    dynamic_sampling: bool = Field(False, description="DAPO dynamic sampling (Yu et al. 2025): groups whose rewards "
                                   "are all equal are not admitted and the step keeps drawing prompts until it has "
                                   "train.prompts_per_step informative groups (needs drop_uniform_groups)")
    max_extra_prompts_per_step: int = Field(64, ge=0, description="dynamic_sampling: most prompts drawn beyond "
                                            "train.prompts_per_step in one step; the step trains on what it has then")
    mask_truncated: bool = Field(False, description="DAPO overlong filtering (Yu et al. 2025): samples cut at "
                                 "max_tokens are masked out of the loss")
    max_staleness: int = Field(0, ge=0, description="0 = on-policy: each step samples its batch with the latest "
                               "weights; s >= 1 = streaming: the actors sample all the time, groups are scored as "
                               "they land, weights are fetched in the background and swapped in between requests, "
                               "and the learner trains on nothing older than s versions (cluster/stream.py); "
                               "s = 2 leaves the buffer a step of room, so a slow step on one side need not stall "
                               "the other, but the learner then trains on rollouts a version older (see README, "
                               "The streaming loop)")

    @model_validator(mode="after")
    def _kl(self) -> AlgorithmConfig:
        if self.kl_target is not None and self.kl_in == "none":
            raise ValueError(f"algorithm.kl_target ({self.kl_target}) steers a KL penalty, but algorithm.kl_in is "
                             "none (no penalty); set kl_in to reward or loss, or kl_target to null")
        return self

    @model_validator(mode="after")
    def _objective(self) -> AlgorithmConfig:
        if self.policy_loss is None:
            self.policy_loss = "nll" if self.name == "rwr" else "ppo"
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ValueError(f"algorithm.dual_clip ({self.dual_clip}) applies to policy_loss ppo only, not "
                             f"{self.policy_loss}; set dual_clip to null")
        if self.tis_cap is None and self.rollout_correction in ("tis", "seq_tis"):
            raise ValueError(f"algorithm.rollout_correction {self.rollout_correction} needs algorithm.tis_cap (a "
                             "number > 0); to turn the correction off set rollout_correction: none")
        if self.dynamic_sampling and not self.drop_uniform_groups:
            raise ValueError("algorithm.dynamic_sampling admits only groups whose rewards differ, but "
                             "algorithm.drop_uniform_groups is false (keep them); set one of the two")
        return self


class LoraConfig(Section):
    """LoRA adapters (Hu et al. 2021) on the policy, trained with ``peft``."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scale numerator: the update is (alpha / r) B A")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | str = Field("all-linear", description="module names to adapt, e.g. [q_proj, "
                                            "v_proj], or all-linear")


class LearnerConfig(Section):
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate of the policy")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps, then constant")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")
    minibatch_size: int = Field(512, ge=1, description="sequences per optimizer step, over all ranks")
    micro_batch_tokens: int = Field(8192, ge=2, description="padded tokens (rows x longest row) per forward/backward; "
                                    "rows are sorted by length and packed up to it (gradient accumulation). On 2 "
                                    "CPU cores a 25M model's step over 17k tokens took 9.5 s at 8192 against 14.8 s "
                                    "in one pass of 32768 (activations beyond the caches); cluster/gpu.yaml sets 16384")
    share_prompts: bool = Field(True, description="forward each distinct prompt of a micro-batch once and the "
                                "responses of its samples on its cached keys and values (Prefix Grouper, Liu et al. "
                                "2025): the same logprobs and gradients with fewer tokens. Off with FSDP, "
                                "gradient checkpointing or compile; false = one pass over each full row")
    mixed_precision: Literal["none", "bf16"] = Field(
        "none", description="bf16 = forward passes under torch.autocast in bfloat16 with float32 weights, gradients "
                            "and AdamW state (as TRL's bf16=True); the frozen reference is held in bfloat16 and the "
                            "engines get model.dtype. On CPU it pays only with bf16 instructions (avx512_bf16, AMX)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory, about a third more compute)")
    compile: bool = Field(False, description="torch.compile the policy's decoder layers (as verl's "
                          "use_torch_compile): in the loop on 2 CPU cores a 25M model's bf16 step took 6.2-6.4 s "
                          "against 7.4-7.8 eager, its first step 30-46 s against 15. Keeps the one-pass forward "
                          "(share_prompts off)")
    lora: LoraConfig | None = Field(None, description="train LoRA adapters (peft) instead of every weight; the "
                                    "actors get the merged weights. null = full fine-tuning")
    num_workers: int = Field(1, ge=1, description="learner ranks: actors in one placement group that form a "
                             "torch.distributed group (gloo on CPU, NCCL on GPU)")
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="with num_workers > 1: ddp = every rank holds the "
                                             "model, gradients summed over ranks | fsdp = parameters, gradients and "
                                             "Adam state sharded over ranks (FSDP2 fully_shard)")
    placement: Literal["pack", "spread"] = Field("pack", description="placement group strategy of the ranks: "
                                                 "pack = as few nodes as possible | spread = one per node if it can")
    fsdp_offload: bool = Field(False, description="fsdp: keep parameters, gradients and optimizer state in CPU "
                               "memory between uses (FSDP2 CPUOffloadPolicy)")
    collective_timeout_s: float = Field(300.0, gt=0, description="timeout of one collective between ranks: a dead "
                                        "rank fails the step after it instead of hanging the group")
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
    critic_warmup_steps: int = Field(0, ge=0, description="ppo: steps at the start in which only the critic "
                                     "learns (the policy is held), so its first advantages come from a fitted value "
                                     "function (OpenRLHF's freezing_actor_steps)")
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

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "micro_batch_size" in data:
            raise ValueError("learner.micro_batch_size was replaced by learner.micro_batch_tokens, a budget of "
                             "padded tokens (rows x longest row) per forward/backward; e.g. micro_batch_size 8 "
                             "with 512-token rows is micro_batch_tokens 4096")
        return data

    @model_validator(mode="after")
    def _batches(self) -> LearnerConfig:
        if self.fsdp_offload and self.strategy != "fsdp":
            raise ValueError("learner.fsdp_offload applies to learner.strategy fsdp; set strategy: fsdp or "
                             "fsdp_offload: false")
        if self.critic_backbone == "shared" and self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError("learner.critic_backbone shared (a value head on the sharded policy) is not supported "
                             "with learner.strategy fsdp; use critic_backbone: separate (sharded the same way) or ddp")
        if self.lora is not None and self.strategy == "fsdp" and self.num_workers > 1:
            raise ValueError("learner.lora with learner.strategy fsdp is not supported; LoRA's adapters are small, "
                             "so use strategy ddp (the frozen base is replicated) or full fine-tuning with fsdp")
        if self.critic_init is not None and self.critic_backbone == "shared":
            raise ValueError("learner.critic_init applies to a separate critic; with learner.critic_backbone=shared "
                             "the value head sits on the policy. Set critic_init to null or critic_backbone=separate")
        if self.critic_init is not None and not Path(self.critic_init).is_dir():
            raise ValueError(f"learner.critic_init {self.critic_init!r} is not a directory; give a reward-model or "
                             f"policy checkpoint directory, or null to start the critic from the policy")
        return self


class OfflineLoopConfig(Section):
    """The loop both offline trainers share: batches in a shuffled order, epoch after epoch, until a budget."""

    batch_size: int = Field(64, ge=1, description="pairs (dpo) or records (rwr) per optimizer step, over all ranks")
    steps: int | None = Field(None, ge=1, description="optimizer steps; null = until time_limit_s (epochs repeat)")
    time_limit_s: float | None = Field(600.0, gt=0, description="wall-clock budget of training (building the data "
                                       "and the reference pass are timed apart)")
    eval_every: int = Field(50, ge=1, description="held-out evaluation every this many steps")
    policy_samples: int = Field(4, ge=1, description="samples per training prompt when the data are built from the "
                                "start policy (pairs, at least 2: a best-scored one is chosen over a worse one)")
    seed: int = Field(0, description="seed of building the data and of their order")


class DPOConfig(OfflineLoopConfig):
    """Offline preference optimisation (``relay dpo``) on the learner group, from a frozen reference = the start."""

    loss: Literal["dpo", "ipo", "cdpo"] = Field(
        "dpo", description="dpo: -log sigmoid(beta h) (Rafailov et al. 2023) | ipo: (h - 1/(2 beta))^2, the IPO "
                           "paper's form with tau = beta (Azar et al. 2023) | cdpo: conservative DPO, the labels "
                           "flipped with probability label_smoothing (Mitchell 2023); h = the chosen log-ratio to the "
                           "reference minus the rejected one")
    beta: float | None = Field(None, gt=0, description="strength of the implicit KL to the reference (IPO: tau); "
                               "null = 0.5 for dpo and cdpo, 0.1 for ipo. Measured on the embedded task from one "
                               "start, 10 minutes: dpo at 0.1 rose, then collapsed below the start (-14.3); at 0.5 it "
                               "held +28.6; ipo at 0.1 gained +39.0")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cdpo: probability that a label is flipped")
    length_normalize: bool = Field(False, description="mean log-prob per response token instead of the sum (a named "
                                   "variant, as SimPO/IPO implementations do); DPO sums")
    eval_pairs: int = Field(256, ge=1, description="held-out pairs measured at each evaluation")
    preferences_path: str | None = Field(None, description="JSONL/JSON/CSV/Parquet of {prompt, chosen, rejected} "
                                         "(strings, or chat messages); null = pairs built from the start policy's "
                                         "own samples on the training prompts, judged by the reward")
    eval_preferences_path: str | None = Field(None, description="held-out pairs; null = a share of the pairs, split "
                                              "by prompt")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of prompts held out when eval_preferences_path "
                                 "is null")

    @model_validator(mode="after")
    def _beta(self) -> DPOConfig:
        if self.beta is None:  # by loss: the measured defaults (description)
            self.beta = 0.1 if self.loss == "ipo" else 0.5
        return self

    @model_validator(mode="after")
    def _smoothing(self) -> DPOConfig:
        if self.label_smoothing > 0 and self.loss != "cdpo":
            raise ValueError(f"dpo.label_smoothing ({self.label_smoothing}) applies to loss cdpo only, not "
                             f"{self.loss}; set loss: cdpo or label_smoothing: 0")
        if self.policy_samples < 2:
            raise ValueError(f"dpo.policy_samples ({self.policy_samples}) must be at least 2: a pair compares two "
                             "samples of one prompt")
        if self.loss == "cdpo" and self.label_smoothing == 0:
            raise ValueError("dpo.loss cdpo needs dpo.label_smoothing > 0 (with 0 it is plain dpo)")
        return self


class RWRConfig(OfflineLoopConfig):
    """Offline reward-weighted regression (``relay rwr``, Peters & Schaal 2007) on the learner group."""

    beta: float = Field(1.0, gt=0, description="temperature of the weights exp(z / beta)")
    whiten: bool = Field(True, description="z = the rewards whitened over each batch, then exp(z / beta) normalised to "
                         "mean 1; false = exp(r / beta) of the raw reward, normalised")
    path: str | None = Field(None, description="JSONL/JSON/CSV/Parquet of {prompt, response, reward}; null = the start "
                             "policy's own samples on the training prompts, scored by the reward")


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
