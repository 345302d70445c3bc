"""The learner: policy, frozen reference, optional value function; scored rollouts in, one update out.

A plain class, one rank of a learner group (``learner/group.py`` makes M of them Ray actors that form
a torch.distributed group; M = 1 is the same code with no collectives). Surface: ``train_step``,
``sequence_logprobs``, the weights out (``publish``, ``save``, ``load_state``: ``learner/policy_io.py``), and the
offline trainers' steps (``learner/offline_steps.py``). All math comes from ``learner/algos.py`` and
``learner/losses.py``. Every forward pass computes each distinct prompt of a micro-batch once and its samples'
responses on its cached keys and values (``learner/shared_prompt.py``, ``learner.share_prompts``).

One step, on this rank's share of the batch (whole groups, so group statistics stay on one rank):
1. no-grad passes give what the update needs: the "old" logprobs (several updates per batch, or
   masked importance sampling), the reference's, and the values; with one epoch and one minibatch the
   old logprobs are the current policy's, detached from the same forward pass (ratio 1 at the start of
   the update, as in verl's on-policy shortcut);
2. advantages; statistics over the whole batch (whitening, the KL measurement) sum over ranks;
3. each optimizer step accumulates token-budget micro-batches. Every loss term is normalised by the
   global count it averages over (tokens for token-mean, sequences for the seq-mean modes), so the
   gradients, summed over micro-batches and ranks, are those of one learner on the whole batch.

PPO's value function is a separate critic (``learner/critic.py``) or, with ``learner.critic_backbone=shared``,
a value head on the policy's last hidden state trained jointly: loss = policy loss + value_coef * value
loss (the shared actor-critic of Schulman et al. 2017, as in Ziegler et al. 2019's ``vf_coef``).
With ``learner.lora`` the policy trains LoRA adapters (``peft``); the frozen reference is then the
same base with the adapters switched off, and the actors receive the merged weights.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core import heap
from core.metrics import METRICS, MetricSink
from core.records import ScoredRollout
from learner import algos, losses, shared_prompt
from learner import distributed as D
from learner.batch import RolloutBatch, collate, padded_tokens, token_budget_split
from learner.config import AlgorithmConfig, LearnerConfig
from learner.critic import Critic
from learner.offline_steps import OfflineSteps
from learner.policy_io import ADAPTER_DIR, PolicyIO


class NonFiniteError(RuntimeError):
    """``learner.max_bad_steps`` steps in a row had a non-finite loss or gradient."""


_EXPORTED = {k for k in METRICS if k.startswith("learner/")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _stop_ids(policy_path: str, tokenizer) -> list[int]:
    """The tokens vLLM's min_tokens holds back: the tokenizer's end-of-sequence and the generation config's."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} - {None}
    try:
        eos = GenerationConfig.from_pretrained(policy_path).eos_token_id
    except OSError:  # no generation_config.json
        eos = None
    ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
    return sorted(ids)


class Learner(OfflineSteps, PolicyIO):
    def __init__(self, policy_path: str, algorithm: AlgorithmConfig, learner: LearnerConfig, dtype: str = "float32",
                 temperature: float = 1.0, max_tokens: int = 1, reference_path: str | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, address: str | None = None, min_tokens: int = 0):
        """``temperature``: the sampler's, so logprobs are of the distribution that sampled; ``max_tokens``: the
        constant of the ``seq-mean-token-sum-norm`` loss aggregation (Dr.GRPO); ``reference_path``: the frozen
        reference when it differs from ``policy_path`` (a resumed run starts the policy from its checkpoint);
        ``seed``: of this process's RNGs (minibatch order, head init), so two runs of one config agree;
        ``rank``, ``world_size``, ``address``: this rank of a learner group and rank 0's ``host:port``;
        ``min_tokens``: the sampler's (no stop token before that many response tokens), mirrored in the logprobs."""
        self.alg, self.lc = algorithm, learner
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.temperature, self.max_tokens, self.min_tokens = temperature, max_tokens, min_tokens
        if self.lc.num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"learner.num_gpus={self.lc.num_gpus} but this process sees no CUDA device")
        if self.lc.torch_threads:
            torch.set_num_threads(self.lc.torch_threads)
        self.device = torch.device("cuda" if self.lc.num_gpus > 0 else "cpu")
        self.dist = D.Collective(rank, world_size, address, self.device, self.lc.collective_timeout_s)
        self.sharded = self.dist.active and self.lc.strategy == "fsdp"
        # FSDP ranks must run the same forward passes (a shared-prompt micro-batch takes two, a dummy one),
        # gradient checkpointing turns the key-value cache off, and compiled layers would trace the cache's
        # Python objects, so all three keep the one-pass forward.
        self.share_prompts = (self.lc.share_prompts and not self.sharded and not self.lc.gradient_checkpointing
                              and not self.lc.compile)
        dtype = DTYPES[dtype]
        # Mixed precision keeps float32 master weights (and a float32 critic) and computes in bfloat16; the frozen
        # reference only computes, so it is held in bfloat16. The engines get model.dtype (see publish).
        mixed = self.lc.mixed_precision == "bf16"
        master = torch.float32 if mixed else dtype
        self.publish_dtype = dtype if dtype != master else None
        self._pack_buffers: dict[str, torch.Tensor] = {}  # publish's host buffers, filled again each version
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.policy = self._load_policy(policy_path, reference_path, master).eval()  # train mode only in updates
        self.published = [n for n, _ in self._base().named_parameters() if "lora_" not in n]
        self.reference = None
        if self.alg.kl_in != "none" and self.lc.lora is None:
            self.reference = AutoModelForCausalLM.from_pretrained(reference_path or policy_path,
                                                                  dtype=torch.bfloat16 if mixed else dtype)
            self.reference = self.reference.to(self.device).eval()
            self.reference.requires_grad_(False)
        self.critic, self.value_head = None, None
        if self.alg.name == "ppo" and self.lc.critic_backbone == "separate":
            self.critic = Critic.build(self.policy, policy_path, self.lc, master)
        elif self.alg.name == "ppo":
            self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1).to(self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
        if self.sharded:  # shard before the optimizers exist, so they hold shards
            for model in (self.policy, self.reference, self.value_head):
                if model is not None:
                    D.shard(model, self.lc.fsdp_offload)
            if self.critic is not None:
                D.shard(self.critic, self.lc.fsdp_offload)
        if self.lc.compile:  # after sharding, as FSDP2 wants
            D.compile_blocks(self.policy)
        if self.critic is not None:
            self.critic.make_optimizer()
        groups = [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": self.lc.lr}]
        if self.value_head is not None:
            groups.append({"params": list(self.value_head.parameters()), "lr": self.lc.critic_head_lr})
        self.trainable = [q for g in groups for q in g["params"]]
        self.estimator = algos.get_advantage_estimator("gae" if self.alg.name == "ppo" else self.alg.name)
        self.optimizer = torch.optim.AdamW(groups, weight_decay=self.lc.weight_decay)
        warmup = max(1, self.lc.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warmup))
        if self.alg.kl_target is not None:
            self.kl_ctl = algos.AdaptiveKLController(self.alg.kl_coef, self.alg.kl_target, self.alg.kl_horizon)
        else:
            self.kl_ctl = algos.FixedKLController(self.alg.kl_coef)
        self.version = 0
        self.bad_steps = 0  # steps in a row whose loss or gradient was not finite
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = _stop_ids(policy_path, self.tokenizer) if min_tokens else []
        self.sink = MetricSink("learner") if self.dist.rank == 0 else None
        self._heartbeat()

    @classmethod
    def from_config(cls, cfg, policy_path: str) -> Learner:
        """From the whole run config (``cluster.config.RelayConfig``, not imported here: layers point one way)."""
        return cls(policy_path, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                   cfg.generation.max_tokens, seed=cfg.train.seed, min_tokens=cfg.generation.min_tokens)

    def _load_policy(self, policy_path: str, reference_path: str | None, dtype):
        """The policy; with LoRA, the base model plus adapters (those of the checkpoint at ``policy_path`` when it
        has them, whose base is then the original model at ``reference_path``; fresh ones otherwise)."""
        lora = self.lc.lora
        adapter = Path(policy_path) / ADAPTER_DIR
        # A checkpoint's adapters are loaded only when continuing a run (policy = the checkpoint, reference = the
        # base it trained from); a LoRA checkpoint given as a start is its merged model, plain.
        resuming = lora is not None and adapter.is_dir() and reference_path not in (None, policy_path)
        base_path = reference_path if resuming else policy_path
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(self.device)
        if self.lc.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if lora is None:
            return model
        from peft import LoraConfig, PeftModel, get_peft_model

        if resuming:
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules, task_type="CAUSAL_LM"))

    def _base(self) -> torch.nn.Module:
        """The Hugging Face model under the LoRA wrapper (the policy itself without LoRA)."""
        return self.policy.get_base_model() if self.lc.lora is not None else self.policy

    def _heartbeat(self) -> None:
        if self.sink is not None:
            self.sink.heartbeat()

    # ---- forward passes -------------------------------------------------------------------
    def _token_logprobs(self, model, batch: RolloutBatch, with_entropy: bool = False, with_values: bool = False):
        """Logprobs ``(B, T)`` of each next token under ``model``, entropy ``(B, T)`` if asked, and the shared
        value head's V(s_t) ``(B, T)`` if asked (position t = the state ending at token t)."""
        split = shared_prompt.split_prompts(batch) if self.share_prompts else None
        if split is not None:
            return self._shared_prompt_logprobs(model, batch, split, with_entropy, with_values)
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        with D.forward_pass(self.lc, self.device, ids.shape[1]):
            # no key-value cache: nothing reads it, and compiled layers would recompile on its state
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=with_values, use_cache=False)
        logits = out.logits[:, :-1].float() / self.temperature
        if self.min_tokens:
            logits = algos.mask_early_stop(logits, batch.response_mask.to(self.device), self.stop_ids, self.min_tokens)
        logprobs = algos.gather_logprobs(logits, ids[:, 1:])
        entropy = algos.entropy_from_logits(logits) if with_entropy else None
        values = self.value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1) if with_values else None
        return logprobs, entropy, values

    def _shared_prompt_logprobs(self, model, batch: RolloutBatch, split: shared_prompt.PromptSplit,
                                with_entropy: bool, with_values: bool):
        """``_token_logprobs`` with each distinct prompt computed once (``learner/shared_prompt.py``): the same
        values at the response positions, 0 elsewhere (every caller masks to the response)."""
        with D.forward_pass(self.lc, self.device, batch.input_ids.shape[1]):
            logits, targets, mask, hidden = shared_prompt.forward(model, batch, split, self.device, with_values)
        logits = logits.float() / self.temperature
        if self.min_tokens:
            logits = algos.mask_early_stop(logits, mask, self.stop_ids, self.min_tokens)

        def at_positions(x: torch.Tensor) -> torch.Tensor:  # (B, R) response-aligned -> the batch's (B, T)
            return shared_prompt.to_positions(x, split, batch.response_mask.shape[1])

        logprobs = at_positions(algos.gather_logprobs(logits, targets))
        entropy = at_positions(algos.entropy_from_logits(logits)) if with_entropy else None
        values = at_positions(self.value_head(hidden.float()).squeeze(-1)) if with_values else None
        return logprobs, entropy, values

    def _plan(self, batch: RolloutBatch, rows: torch.Tensor) -> list[torch.Tensor]:
        """Token-budget micro-batches of ``rows``. Sharded ranks must run the same number of forward passes
        (each gathers parameters from all ranks), so a rank that has run out gets empty ones."""
        groups = batch.group_ids if self.share_prompts else None
        micro = token_budget_split(batch.lengths(), rows, self.lc.micro_batch_tokens, groups)
        if self.sharded:
            micro += [rows[:0]] * (int(self.dist.all_max(len(micro))) - len(micro))
        return micro

    def _dummy(self) -> RolloutBatch:
        """Two pad tokens and empty masks: the forward pass of a rank with no rows left, weighted 0."""
        zeros = torch.zeros((1, 1))
        return RolloutBatch(torch.full((1, 2), self.pad_id), torch.ones((1, 2), dtype=torch.long), zeros, zeros,
                            torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, dtype=torch.bool), loss_mask=zeros, old_logprobs=zeros,
                            ref_logprobs=zeros, values=zeros, advantages=zeros, returns=zeros)

    @torch.no_grad()
    def _no_grad_pass(self, model, batch: RolloutBatch, with_values: bool = False, adapters_off: bool = False):
        """Logprobs ``(B, T)`` under ``model`` without gradients, and the shared head's values if asked;
        ``adapters_off``: the LoRA policy's base model, i.e. the frozen reference."""
        logprobs = torch.zeros(batch.response_mask.shape, device=self.device)
        values = torch.zeros_like(logprobs) if with_values else None
        for idx in self._plan(batch, torch.arange(len(batch))):
            part = batch.select(idx) if len(idx) else self._dummy()
            with model.disable_adapter() if adapters_off else nullcontext():
                lp, _, v = self._token_logprobs(model, part, with_values=with_values)
            if len(idx):
                logprobs[idx, : lp.shape[1]] = lp
                if with_values:
                    values[idx, : v.shape[1]] = v
        return logprobs, values

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, scored: list[ScoredRollout], width: int | None = None) -> dict[str, float]:
        """Compute advantages and update the policy (and value function) on one step's scored rollouts: this
        rank's share, padded to ``width`` tokens so that per-position statistics line up over ranks."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        n_total = self.dist.sum_floats([float(len(scored))])[0]
        if not n_total:  # every sample was excluded (reward errors, staleness): nothing to learn from
            return {"learner/kept_fraction": 0.0, "learner/kl_coef": self.kl_ctl.value}
        batch = collate(scored, self.pad_id, width or (None if scored else 2))
        keep = torch.ones(len(batch), dtype=torch.bool)
        if self.alg.drop_uniform_groups and self.alg.name != "ppo" and len(batch):
            keep = ~algos.uniform_group_mask(batch.rewards, batch.group_ids)
        n_kept = self.dist.sum_floats([float(keep.sum())])[0]
        stats = {"learner/kept_fraction": n_kept / n_total}
        if not n_kept:  # every group scored alike: nothing to learn from this batch
            stats.update({"learner/kl_coef": self.kl_ctl.value, "learner/steps_total": 1.0})
            self._log(stats)
            return stats
        batch = batch.select(keep.nonzero().squeeze(1), trim=False)
        mask = batch.response_mask.to(self.device)
        loss_mask = mask
        if self.alg.mask_truncated:  # DAPO's overlong filtering: cut responses leave the loss (not the advantages)
            loss_mask = mask * ~batch.truncated.to(self.device).unsqueeze(1)
            truncated = self.dist.sum_floats([float(batch.truncated.sum())])[0]
            stats["learner/truncated_masked_fraction"] = truncated / n_kept

        # One no-grad pass of the policy before the update gives whatever needs it: the "old" logprobs
        # (several updates per batch; masked IS, whose mask must be known before the loss is normalised),
        # the logprobs the KL is measured at, and the shared head's values.
        separate_old = (self.lc.epochs > 1 or self.lc.minibatch_size < n_kept
                        or self.alg.rollout_correction == "masked_is")
        shared = self.value_head is not None
        current, values = None, None
        if separate_old or shared or self.alg.kl_in != "none":
            current, values = self._no_grad_pass(self.policy, batch, with_values=shared)
        ref_logprobs = None
        if self.reference is not None:
            ref_logprobs = self._no_grad_pass(self.reference, batch)[0]
        elif self.alg.kl_in != "none":  # LoRA: the reference is the base model
            ref_logprobs = self._no_grad_pass(self.policy, batch, adapters_off=True)[0]
        if self.critic is not None:
            values = self.critic.values(batch, self.device, self._plan, self._dummy)
        if self.alg.rollout_correction == "masked_is":  # tokens outside the band leave the loss
            _, kept, _ = losses.rollout_correction(current, batch.behaviour_logprobs.to(self.device), loss_mask,
                                                   "masked_is", low=self.alg.is_low, high=self.alg.is_high)
            loss_mask = kept.to(mask.dtype)
        batch = batch.with_fields(loss_mask=loss_mask, old_logprobs=current if separate_old else None,
                                  ref_logprobs=ref_logprobs, values=values)
        timings["logprobs"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        advantages, returns, kl_stats = self._advantages(batch, mask, current)
        batch = batch.with_fields(advantages=advantages, returns=returns)
        timings["advantages"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        update_stats = self._update(batch, n_kept)
        timings["update"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0

        self.kl_ctl.update(kl_stats.get("learner/kl", 0.0), int(n_kept))
        stats.update(kl_stats)
        stats.update(update_stats)
        all_sum = self.dist.all_sum if self.dist.active else None
        stats.update({
            "learner/kl_coef": self.kl_ctl.value,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/advantage_mean": algos.masked_mean(advantages, mask, all_sum=all_sum).item(),
            "learner/advantage_std": algos.masked_var(advantages, mask, all_sum=all_sum).sqrt().item(),
            "learner/return_mean": algos.masked_mean(returns, mask, all_sum=all_sum).item(),
            "learner/tokens_trained_total": self.dist.sum_floats([float(mask.sum().item())])[0],
            "learner/steps_total": 1.0,
        })
        stats.update({f"learner/step_seconds{{phase={k}}}": v for k, v in timings.items()})
        self._log(stats)
        return stats

    def _log(self, stats: dict[str, float]) -> None:
        if self.sink is not None:
            self.sink.log({k: v for k, v in stats.items() if k in _EXPORTED or k.startswith("learner/step_seconds")})
            self.sink.heartbeat()

    def _advantages(self, batch: RolloutBatch, mask, current):
        """``current``: the policy's logprobs before this update (the policy that sampled, on-policy)."""
        all_sum = self.dist.all_sum if self.dist.active else None
        seq_rewards = algos.baseline_rewards(batch.rewards.to(self.device), batch.group_ids.to(self.device),
                                             self.alg.reward_baseline, all_sum=all_sum)
        stats: dict[str, float] = {}
        if batch.ref_logprobs is not None:
            kl = algos.kl_estimate(current, batch.ref_logprobs, self.alg.kl_kind) * mask
            stats["learner/kl"] = algos.masked_mean(kl, mask, all_sum=all_sum).item()
        if self.alg.kl_in == "reward":
            token_rewards = algos.token_rewards_with_kl(seq_rewards, kl, mask, self.kl_ctl.value)
        else:
            token_rewards = algos.place_reward_on_last_token(seq_rewards, mask)
        extra = {"outcome_rewards": seq_rewards} if self.alg.name == "reinforce_pp_baseline" else {}
        if self.alg.name in algos.BATCH_WIDE:
            extra["all_sum"] = all_sum
        if self.alg.name == "rwr":
            extra.update(beta=self.alg.rwr_beta, whiten=self.alg.rwr_whiten)
        with torch.no_grad():
            advantages, returns = self.estimator(
                token_rewards=token_rewards, mask=mask, group_ids=batch.group_ids.to(self.device),
                values=batch.values, gamma=self.alg.gamma, lam=self.alg.lam, **extra,
            )
            if self.alg.name == "ppo":
                advantages = algos.masked_whiten(advantages, mask, all_sum=all_sum)
        return advantages, returns, stats

    def _normalisers(self, batch: RolloutBatch, rows: torch.Tensor) -> dict[str, float]:
        """The counts, over all ranks, that this minibatch's losses average over."""
        lm, rm = batch.loss_mask[rows], batch.response_mask[rows]
        local = [float(lm.sum()), float(lm.bool().any(-1).sum()), float(rm.sum()), float(len(rows))]
        tokens, seqs, value_tokens, n = self.dist.sum_floats(local)
        # FSDP averages the ranks' gradients where these normalised losses need their sum
        scale = float(self.dist.world_size) if self.sharded else 1.0
        return {"tokens": max(tokens, 1.0), "seqs": max(seqs, 1.0), "value_tokens": max(value_tokens, 1.0),
                "rows": max(n, 1.0), "scale": scale}

    def _update(self, batch: RolloutBatch, n_kept: float) -> dict[str, float]:
        self._train_mode(True)
        try:
            return self._optimise(batch, n_kept)
        finally:
            self._train_mode(False)

    def _optimise(self, batch: RolloutBatch, n_kept: float) -> dict[str, float]:
        n = len(batch)
        sums: dict[str, float] = {}
        # A non-finite reward makes its group's advantages non-finite. Skip the whole step, not only the minibatches
        # holding those rows, so a skipped step leaves every weight as the last good step left it.
        bad = float(not (batch.advantages.isfinite().all() and batch.returns.isfinite().all()))
        finite = not self.dist.sum_floats([bad])[0]
        updates, skipped = 0, int(not finite)
        lengths = batch.lengths()
        real = padded = 0.0
        # Critic warm-up (OpenRLHF's freezing_actor_steps): for the first steps only the value function learns, so
        # the policy's first advantages do not come from a critic that has never seen this policy's returns.
        warming = self.critic is not None and self.version < self.lc.critic_warmup_steps
        for _ in range(self.lc.epochs if finite else 0):
            order = torch.randperm(n)
            for mb in torch.tensor_split(order, math.ceil(n_kept / self.lc.minibatch_size)):
                norm = self._normalisers(batch, mb)
                if warming:
                    for k, v in self.critic.update(batch, self._plan(batch, mb), norm, self.alg, self.dist,
                                                   self._dummy).items():
                        sums[k] = sums.get(k, 0.0) + v
                    updates += 1
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                micro = self._plan(batch, mb)
                real, padded = (a + b for a, b in zip((real, padded), padded_tokens(lengths, micro), strict=True))
                mb_sums: dict[str, float] = {}
                for idx in micro:
                    part = self._micro_loss(batch.select(idx), norm) if len(idx) else self._dummy_backward()
                    for k, v in part.items():
                        mb_sums[k] = mb_sums.get(k, 0.0) + v
                if not self.sharded:
                    self.dist.sum_grads(self.trainable)
                grad_norm = _total(torch.nn.utils.clip_grad_norm_(self.trainable, self.lc.max_grad_norm))
                local_bad = float(not all(math.isfinite(v) for v in mb_sums.values()))
                if not math.isfinite(grad_norm) or self.dist.sum_floats([local_bad])[0]:
                    self.optimizer.zero_grad(set_to_none=True)  # skip it: one NaN would poison every weight
                    skipped += 1
                    continue
                self.optimizer.step()
                self.scheduler.step()
                mb_sums["learner/grad_norm"] = grad_norm / self.dist.world_size  # summed over ranks below
                if self.critic is not None:
                    mb_sums.update(self.critic.update(batch, micro, norm, self.alg, self.dist, self._dummy))
                for k, v in mb_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                updates += 1
        skipped = int(self.dist.all_max(skipped))
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if self.bad_steps >= self.lc.max_bad_steps:
            raise NonFiniteError(f"the loss or gradient was not finite in {self.bad_steps} steps in a row "
                                 f"(learner.max_bad_steps={self.lc.max_bad_steps}); the run stopped before applying "
                                 "them. Look at the rewards (reward/mean, reward/std) and lower learner.lr")
        keys = self._stat_keys()  # every rank reduces the same keys, also one that had no rows
        totals = dict(zip(keys, self.dist.sum_floats([sums.get(k, 0.0) for k in keys]), strict=True))
        out = {k: v / max(updates, 1) for k, v in totals.items()}
        out["learner/bad_steps_total"] = float(bool(skipped))
        out["learner/critic_warmup"] = float(warming)
        real, padded = self.dist.sum_floats([real, padded])
        out["learner/padding_fraction"] = 1.0 - real / padded if padded else 0.0
        if batch.values is not None and updates:
            all_sum = self.dist.all_sum if self.dist.active else None
            out["learner/explained_variance"] = losses.explained_variance(
                batch.values, batch.returns, batch.response_mask.to(self.device), all_sum=all_sum).item()
        return out

    def _stat_keys(self) -> list[str]:
        keys = ["learner/policy_loss", "learner/entropy", "learner/clip_fraction", "learner/approx_kl",
                "learner/tis_weight_mean", "learner/logprob_gap_mean", "learner/logprob_gap_max",
                "learner/corrected_fraction", "learner/grad_norm"]
        if self.value_head is not None or self.critic is not None:
            keys += ["learner/value_loss", "learner/value_clip_fraction"]
        return keys

    def _train_mode(self, on: bool) -> None:
        """Train mode for the gradient passes (gradient checkpointing and dropout act only there), eval mode for
        the no-grad ones."""
        for model in (self.policy, self.value_head, self.critic):
            if model is not None:
                model.train(on)

    def _micro_loss(self, micro: RolloutBatch, norm: dict[str, float]) -> dict[str, float]:
        """Backward of this micro-batch's share of the minibatch loss; returns its share of the statistics."""
        shared = self.value_head is not None
        d = self.device
        mask, loss_mask = micro.response_mask.to(d), micro.loss_mask.to(d)
        logprobs, entropy, values = self._token_logprobs(self.policy, micro, with_entropy=True, with_values=shared)
        old = logprobs.detach() if micro.old_logprobs is None else micro.old_logprobs.to(d)
        is_weights, keep, correction = losses.rollout_correction(
            old, micro.behaviour_logprobs.to(d), loss_mask, self.alg.rollout_correction,
            cap=self.alg.tis_cap, low=self.alg.is_low, high=self.alg.is_high)
        in_loss = keep.to(mask.dtype)  # the policy's tokens: without truncated samples or masked_is rejects
        # Each term is a mean over this micro-batch; weighted by its share of the minibatch's global count it
        # becomes that term's share of the mean over the whole minibatch, on every rank.
        tokens = float(in_loss.sum())
        by_seq = self.alg.loss_agg != "token-mean"
        w_policy = (float(in_loss.bool().any(-1).sum()) / norm["seqs"]) if by_seq else tokens / norm["tokens"]
        w_tokens, w_rows = tokens / norm["tokens"], len(micro) / norm["rows"]
        loss, pstats = losses.get_policy_loss(self.alg.policy_loss)(
            logprobs, old, micro.advantages.to(d), in_loss, clip_low=self.alg.clip_low,
            clip_high=self.alg.clip_high, dual_clip=self.alg.dual_clip, agg_mode=self.alg.loss_agg,
            loss_norm_constant=self.max_tokens, is_weights=is_weights,
        )
        stats = {"learner/policy_loss": loss.item() * w_policy}
        loss = loss * w_policy
        entropy_mean = losses.aggregate_loss(entropy, in_loss, "token-mean")
        if self.alg.entropy_coef > 0:
            loss = loss - self.alg.entropy_coef * entropy_mean * w_tokens
        if self.alg.kl_in == "loss":
            kl = losses.kl_loss(logprobs, micro.ref_logprobs.to(d), in_loss, self.alg.kl_kind, self.alg.loss_agg,
                                loss_norm_constant=self.max_tokens)
            loss = loss + self.kl_ctl.value * kl * w_policy
        if shared:
            w_value = float(mask.sum()) / norm["value_tokens"]
            vloss, vclipped = losses.value_loss(values, micro.values.to(d), micro.returns.to(d), mask,
                                                clip=self.lc.value_clip)
            loss = loss + self.lc.value_coef * vloss * w_value
            stats.update({"learner/value_loss": vloss.item() * w_value,
                          "learner/value_clip_fraction": float(vclipped) * w_rows})
        (loss * norm["scale"]).backward()
        stats.update({
            "learner/entropy": entropy_mean.item() * w_rows,
            "learner/clip_fraction": pstats.clip_fraction.item() * w_rows,
            "learner/approx_kl": pstats.approx_kl.item() * w_rows,
            "learner/tis_weight_mean": pstats.tis_weight_mean.item() * w_rows,
            "learner/logprob_gap_mean": correction.logprob_gap_mean.item() * w_rows,
            "learner/logprob_gap_max": correction.logprob_gap_max.item() * w_rows,
            "learner/corrected_fraction": correction.corrected_fraction.item() * w_rows,
        })
        return stats

    def _empty_pass(self, train: bool) -> None:
        """The pass of a rank that has run out of rows (sharded ranks gather in every pass): with a zero-weight
        backward when training."""
        if train:
            self._dummy_backward()
        else:
            with torch.no_grad():
                self._token_logprobs(self.policy, self._dummy())

    def _dummy_backward(self) -> dict[str, float]:
        """A rank with no rows left still runs forward and backward (sharded ranks gather and reduce together)."""
        shared = self.value_head is not None
        logprobs, _, values = self._token_logprobs(self.policy, self._dummy(), with_values=shared)
        zero = logprobs.sum() * 0.0
        (zero + values.sum() * 0.0 if shared else zero).backward()
        return {}

    def _apply_step(self, loss: float) -> dict[str, float]:
        """Sum the gradients over ranks (ddp), clip, and step unless the loss or gradient is not finite."""
        if not self.sharded:
            self.dist.sum_grads(self.trainable)
        grad_norm = _total(torch.nn.utils.clip_grad_norm_(self.trainable, self.lc.max_grad_norm))
        if math.isfinite(grad_norm) and math.isfinite(loss):
            self.optimizer.step()
            self.scheduler.step()
            self.bad_steps = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_steps += 1
            if self.bad_steps >= self.lc.max_bad_steps:
                raise NonFiniteError(f"the loss or gradient was not finite in {self.bad_steps} steps in a row "
                                     f"(learner.max_bad_steps); lower learner.lr (or dpo.beta)")
        return {"offline/grad_norm": grad_norm, "offline/lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The policy's logprobs of ``response_ids`` after ``prompt_ids`` (temperature 1); every rank calls it."""
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=self.device)
        logits = self.policy(input_ids=ids).logits[:, :-1].float()
        lp = algos.gather_logprobs(logits, ids[:, 1:])[0, len(prompt_ids) - 1 :]
        return lp.tolist()

    def memory(self) -> dict[str, float]:
        """Bytes this rank holds of parameters, gradients and optimizer state, and its resident set size."""
        import resource

        params = [p for m in (self.policy, self.reference, self.critic, self.value_head) if m is not None
                  for p in m.parameters()]
        opt = [t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
        return {"param_bytes": float(D.local_bytes(params)),
                "grad_bytes": float(D.local_bytes(p.grad for p in params)),
                "optimizer_bytes": float(D.local_bytes(opt)),
                "max_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}

    def state(self) -> dict[str, float]:
        return {"version": self.version, "kl_coef": self.kl_ctl.value}

    def freeze_heap(self) -> None:
        """Leave the objects of start-up out of later full collections (``core.heap``): otherwise 0.3 s pauses,
        three in an 80 s streaming run. The group calls it once the learner lives in a process of its own."""
        heap.freeze()


def _total(norm) -> float:
    """clip_grad_norm_'s total norm as a float (a DTensor when the gradients are sharded)."""
    return float(norm.full_tensor().item() if hasattr(norm, "full_tensor") else norm.item())
