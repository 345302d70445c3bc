"""The learner: policy, frozen reference, optional critic; scored rollouts in, one update out.

A plain class; ``cluster/driver.py`` makes it a Ray actor. Surface: ``train_step``,
``publish``, ``save``, ``sequence_logprobs``. All math comes from ``learner/algos.py``.

Simplifications, on purpose:
- One learner process, no data or tensor parallelism: the policy must fit one device.
- With one epoch and one minibatch the "old" logprobs are the current policy's, detached
  from the same forward pass (ratio 1 at the start of the update, as in verl's on-policy
  shortcut); with more updates per batch they come from a separate no-grad pass.
- The reference model is loaded only when a KL term is configured.
- PPO's critic is a separate model (``learner/critic.py``), or, with ``learner.critic_backbone=shared``,
  a value head on the policy's last hidden state trained jointly: loss = policy loss + value_coef *
  value loss (the shared actor-critic of Schulman et al. 2017, as in Ziegler et al. 2019's ``vf_coef``).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.metrics import METRICS, MetricSink
from core.records import ScoredRollout
from learner import algos
from learner.batch import RolloutBatch, collate
from learner.config import AlgorithmConfig, LearnerConfig
from learner.critic import Critic
from learner.weights import PackedWeights, pack_weights

STATE_FILE = "trainer_state.pt"
"""everything besides the Hugging Face weights that an exact resume needs (``Learner.save``)"""


class NonFiniteError(RuntimeError):
    """``learner.max_bad_steps`` steps in a row had a non-finite loss or gradient."""


_EXPORTED = {k for k in METRICS if k.startswith("learner/")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Learner:
    def __init__(self, policy_path: str, algorithm: AlgorithmConfig, learner: LearnerConfig, dtype: str = "float32",
                 temperature: float = 1.0, max_tokens: int = 1, reference_path: str | None = None, seed: int = 0):
        """``temperature``: the sampler's, so logprobs are of the distribution that sampled; ``max_tokens``: the
        constant of the ``seq-mean-token-sum-norm`` loss aggregation (Dr.GRPO); ``reference_path``: the frozen
        reference when it differs from ``policy_path`` (a resumed run starts the policy from its checkpoint);
        ``seed``: of this process's RNGs (minibatch order, head init), so two runs of one config agree."""
        self.alg, self.lc = algorithm, learner
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.temperature, self.max_tokens = temperature, max_tokens
        if self.lc.num_gpus > 0 and not torch.cuda.is_available():
            raise RuntimeError(f"learner.num_gpus={self.lc.num_gpus} but this process sees no CUDA device")
        if self.lc.torch_threads:
            torch.set_num_threads(self.lc.torch_threads)
        self.device = torch.device("cuda" if self.lc.num_gpus > 0 else "cpu")
        dtype = DTYPES[dtype]
        self.tokenizer = AutoTokenizer.from_pretrained(policy_path)
        self.policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=dtype).to(self.device)
        self.reference = None
        if self.alg.kl_in != "none":
            self.reference = AutoModelForCausalLM.from_pretrained(reference_path or policy_path, dtype=dtype)
            self.reference = self.reference.to(self.device).eval()
            self.reference.requires_grad_(False)
        self.critic, self.value_head = None, None
        groups = [{"params": list(self.policy.parameters()), "lr": self.lc.lr}]
        if self.alg.name == "ppo" and self.lc.critic_backbone == "separate":
            self.critic = Critic.build(self.policy, policy_path, self.lc, dtype)
        elif self.alg.name == "ppo":
            self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1).to(self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
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
        self.sink = MetricSink("learner")
        self.sink.heartbeat()

    @classmethod
    def from_config(cls, cfg, policy_path: str) -> Learner:
        """From the whole run config (``cluster.config.RelayConfig``, not imported here: layers point one way)."""
        return cls(policy_path, cfg.algorithm, cfg.learner, cfg.model.dtype, cfg.generation.temperature,
                   cfg.generation.max_tokens, seed=cfg.train.seed)

    # ---- forward passes -------------------------------------------------------------------
    def _token_logprobs(self, model, batch: RolloutBatch, with_entropy: bool = False, with_values: bool = False):
        """Logprobs ``(B, T)`` of each next token under ``model``, entropy ``(B, T)`` if asked, and the shared
        value head's V(s_t) ``(B, T)`` if asked (position t = the state ending at token t)."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=with_values)
        logits = out.logits[:, :-1].float() / self.temperature
        logprobs = algos.gather_logprobs(logits, ids[:, 1:])
        entropy = algos.entropy_from_logits(logits) if with_entropy else None
        values = self.value_head(out.hidden_states[-1][:, :-1].float()).squeeze(-1) if with_values else None
        return logprobs, entropy, values

    @torch.no_grad()
    def _no_grad_pass(self, model, batch: RolloutBatch, with_values: bool = False):
        """Logprobs ``(B, T)`` under ``model`` without gradients, and the shared head's values if asked."""
        parts = [self._token_logprobs(model, batch.select(idx), with_values=with_values)
                 for idx in self._micro_indices(len(batch))]
        values = torch.cat([p[2] for p in parts]) if with_values else None
        return torch.cat([p[0] for p in parts]), values

    def _micro_indices(self, n: int, order: torch.Tensor | None = None):
        order = torch.arange(n) if order is None else order
        return list(order.split(self.lc.micro_batch_size))

    # ---- one step ---------------------------------------------------------------------------
    def train_step(self, scored: list[ScoredRollout]) -> dict[str, float]:
        """Compute advantages and update the policy (and critic) on one step's scored rollouts."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if not scored:  # every sample was excluded (reward errors, staleness): nothing to learn from
            return {"learner/kept_fraction": 0.0, "learner/kl_coef": self.kl_ctl.value}
        batch = collate(scored, self.pad_id)
        keep = torch.ones(len(batch), dtype=torch.bool)
        if self.alg.drop_uniform_groups and self.alg.name != "ppo":
            keep = ~algos.uniform_group_mask(batch.rewards, batch.group_ids)
        stats = {"learner/kept_fraction": keep.float().mean().item()}
        if not keep.any():  # every group scored alike: nothing to learn from this batch
            stats.update({"learner/kl_coef": self.kl_ctl.value, "learner/steps_total": 1.0})
            self.sink.log(stats)
            self.sink.heartbeat()
            return stats
        batch = batch.select(keep.nonzero().squeeze(1))
        mask = batch.response_mask.to(self.device)
        if self.alg.mask_truncated:  # DAPO's overlong filtering: cut responses leave the loss (not the advantages)
            stats["learner/truncated_masked_fraction"] = batch.truncated.float().mean().item()

        # One no-grad pass of the policy before the update gives whatever needs it: the "old" logprobs
        # (several updates per batch), the logprobs the KL is measured at, and the shared head's values.
        separate_old = self.lc.epochs > 1 or self.lc.minibatch_size < len(batch)
        shared = self.value_head is not None
        current, values = None, None
        if separate_old or shared or self.reference is not None:
            current, values = self._no_grad_pass(self.policy, batch, with_values=shared)
        old_logprobs = current if separate_old else None
        ref_logprobs = self._no_grad_pass(self.reference, batch)[0] if self.reference is not None else None
        if self.critic is not None:
            values = self.critic.values(batch, self.device, self.lc.micro_batch_size)
        timings["logprobs"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        advantages, returns, kl_stats = self._advantages(batch, mask, current, ref_logprobs, values)
        timings["advantages"] = time.perf_counter() - t1

        t2 = time.perf_counter()
        update_stats = self._update(batch, mask, advantages, returns, old_logprobs, ref_logprobs, values)
        timings["update"] = time.perf_counter() - t2
        timings["total"] = time.perf_counter() - t0

        self.kl_ctl.update(kl_stats.get("learner/kl", 0.0), len(batch))
        stats.update(kl_stats)
        stats.update(update_stats)
        stats.update({
            "learner/kl_coef": self.kl_ctl.value,
            "learner/lr": self.scheduler.get_last_lr()[0],
            "learner/advantage_mean": algos.masked_mean(advantages, mask).item(),
            "learner/advantage_std": algos.masked_var(advantages, mask).sqrt().item(),
            "learner/return_mean": algos.masked_mean(returns, mask).item(),
            "learner/tokens_trained_total": float(mask.sum().item()),
            "learner/steps_total": 1.0,
        })
        stats.update({f"learner/step_seconds{{phase={k}}}": v for k, v in timings.items()})
        self.sink.log({k: v for k, v in stats.items() if k in _EXPORTED or k.startswith("learner/step_seconds")})
        self.sink.heartbeat()
        return stats

    def _advantages(self, batch, mask, current, ref_logprobs, values):
        """``current``: the policy's logprobs before this update (the policy that sampled, on-policy)."""
        seq_rewards = batch.rewards.to(self.device)
        stats: dict[str, float] = {}
        if ref_logprobs is not None:
            kl = algos.kl_estimate(current, ref_logprobs, self.alg.kl_kind) * mask
            stats["learner/kl"] = algos.masked_mean(kl, mask).item()
        if self.alg.kl_in == "reward":
            token_rewards = algos.token_rewards_with_kl(seq_rewards, kl, mask, self.kl_ctl.value)
        else:
            token_rewards = algos.place_reward_on_last_token(seq_rewards, mask)
        extra = {"outcome_rewards": seq_rewards} if self.alg.name == "reinforce_pp_baseline" else {}
        with torch.no_grad():
            advantages, returns = self.estimator(
                token_rewards=token_rewards, mask=mask, group_ids=batch.group_ids.to(self.device),
                values=values, gamma=self.alg.gamma, lam=self.alg.lam, **extra,
            )
            if self.alg.name == "ppo":
                advantages = algos.masked_whiten(advantages, mask)
        return advantages, returns, stats

    def _update(self, batch, mask, advantages, returns, old_logprobs, ref_logprobs, values) -> dict[str, float]:
        n = len(batch)
        sums: dict[str, float] = {}
        # A non-finite reward makes its group's advantages non-finite. Skip the whole step, not only the minibatches
        # holding those rows, so a skipped step leaves every weight as the last good step left it.
        finite = bool(advantages.isfinite().all() and returns.isfinite().all())
        updates, skipped = 0, int(not finite)
        for _ in range(self.lc.epochs if finite else 0):
            order = torch.randperm(n)
            for mb in order.split(self.lc.minibatch_size):
                self.optimizer.zero_grad(set_to_none=True)
                mb_sums: dict[str, float] = {}
                for micro in self._micro_indices(len(mb), mb):
                    part = self._micro_loss(batch.select(micro), mask[micro], advantages[micro],
                                            None if old_logprobs is None else old_logprobs[micro],
                                            None if ref_logprobs is None else ref_logprobs[micro],
                                            weight=len(micro) / len(mb),
                                            old_values=None if self.value_head is None else values[micro],
                                            returns=returns[micro])
                    for k, v in part.items():
                        mb_sums[k] = mb_sums.get(k, 0.0) + v
                grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.lc.max_grad_norm).item()
                if not (math.isfinite(grad_norm) and all(math.isfinite(v) for v in mb_sums.values())):
                    self.optimizer.zero_grad(set_to_none=True)  # skip it: one NaN would poison every weight
                    skipped += 1
                    continue
                self.optimizer.step()
                self.scheduler.step()
                mb_sums["learner/grad_norm"] = grad_norm
                if self.critic is not None:
                    mb_sums.update(self.critic.update(batch.select(mb), mask[mb], values[mb], returns[mb], self.alg))
                for k, v in mb_sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                updates += 1
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        if self.bad_steps >= self.lc.max_bad_steps:
            raise NonFiniteError(f"the loss or gradient was not finite in {self.bad_steps} steps in a row "
                                 f"(learner.max_bad_steps={self.lc.max_bad_steps}); the run stopped before applying "
                                 "them. Look at the rewards (reward/mean, reward/std) and lower learner.lr")
        out = {k: v / updates for k, v in sums.items()}
        out["learner/bad_steps_total"] = float(bool(skipped))
        if self.value_head is not None and updates:
            out["learner/explained_variance"] = algos.explained_variance(values, returns, mask).item()
        return out

    def _micro_loss(self, micro: RolloutBatch, mask, advantages, old_logprobs, ref_logprobs, weight: float,
                    old_values=None, returns=None):
        shared = self.value_head is not None
        logprobs, entropy, values = self._token_logprobs(self.policy, micro, with_entropy=True, with_values=shared)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        loss_mask = mask * ~micro.truncated.to(self.device).unsqueeze(1) if self.alg.mask_truncated else mask
        is_weights, keep, correction = algos.rollout_correction(
            old, micro.behaviour_logprobs.to(self.device), loss_mask, self.alg.rollout_correction,
            cap=self.alg.tis_cap, low=self.alg.is_low, high=self.alg.is_high)
        loss, pstats = algos.get_policy_loss(self.alg.policy_loss)(
            logprobs, old, advantages, keep.to(mask.dtype), clip_low=self.alg.clip_low, clip_high=self.alg.clip_high,
            dual_clip=self.alg.dual_clip, agg_mode=self.alg.loss_agg, loss_norm_constant=self.max_tokens,
            is_weights=is_weights,
        )
        stats = {"learner/policy_loss": loss.item() * weight}
        in_loss = keep.to(mask.dtype)  # the policy's tokens: without truncated samples or masked_is rejects
        entropy_mean = algos.aggregate_loss(entropy, in_loss, "token-mean")
        if self.alg.entropy_coef > 0:
            loss = loss - self.alg.entropy_coef * entropy_mean
        if self.alg.kl_in == "loss":
            kl = algos.kl_loss(logprobs, ref_logprobs, in_loss, self.alg.kl_kind, self.alg.loss_agg,
                               loss_norm_constant=self.max_tokens)
            loss = loss + self.kl_ctl.value * kl
        if shared:
            vloss, vclipped = algos.value_loss(values, old_values, returns, mask, clip=self.lc.value_clip)
            loss = loss + self.lc.value_coef * vloss
            stats.update({"learner/value_loss": vloss.item() * weight,
                          "learner/value_clip_fraction": float(vclipped) * weight})
        (loss * weight).backward()
        stats.update({
            "learner/entropy": entropy_mean.item() * weight,
            "learner/clip_fraction": pstats.clip_fraction.item() * weight,
            "learner/approx_kl": pstats.approx_kl.item() * weight,
            "learner/tis_weight_mean": pstats.tis_weight_mean.item() * weight,
            "learner/logprob_gap_mean": correction.logprob_gap_mean.item() * weight,
            "learner/logprob_gap_max": correction.logprob_gap_max.item() * weight,
            "learner/corrected_fraction": correction.corrected_fraction.item() * weight,
        })
        return stats

    # ---- weights out --------------------------------------------------------------------------
    def publish(self) -> tuple[int, list, dict[str, float]]:
        """Pack the policy under its Hugging Face names and ``ray.put`` it once; returns ``[ref]``."""
        import ray

        start = time.perf_counter()
        self.version += 1
        packed: PackedWeights = pack_weights(self.policy.named_parameters(), self.version)
        ref = ray.put(packed)
        stats = {"sync/publish_seconds": time.perf_counter() - start, "sync/bytes": float(packed.nbytes)}
        return self.version, [ref], stats

    def save(self, path: str) -> str:
        """The policy in Hugging Face format (and the critic's, for use elsewhere), plus ``trainer_state.pt``:
        optimizer, LR schedule, critic and its optimizer, value head, KL controller, version and this process's
        RNG states, which is what ``load_state`` needs to continue exactly."""
        self.policy.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        if self.critic is not None:
            self.critic.save(f"{path}/critic")
        if self.value_head is not None:
            torch.save(self.value_head.state_dict(), f"{path}/value_head.pt")
        torch.save({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "kl_coef": self.kl_ctl.value,
            "version": self.version,
            "bad_steps": self.bad_steps,
            "critic": None if self.critic is None else self.critic.state_dict(),
            "critic_optimizer": None if self.critic is None else self.critic.optimizer.state_dict(),
            "value_head": None if self.value_head is None else self.value_head.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }, Path(path) / STATE_FILE)
        return path

    def load_state(self, path: str) -> int:
        """Continue from a ``save``d checkpoint whose policy this learner was built from; returns its version."""
        state = torch.load(Path(path) / STATE_FILE, weights_only=False, map_location="cpu")  # any device -> this one
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]
        self.version, self.bad_steps = state["version"], state["bad_steps"]
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic.optimizer.load_state_dict(state["critic_optimizer"])
        if self.value_head is not None:
            self.value_head.load_state_dict(state["value_head"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return self.version

    def set_version(self, version: int) -> None:
        """Number the next published version after ``version`` (a learner restored while actors ran ahead)."""
        self.version = version

    @torch.no_grad()
    def sequence_logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        """The policy's logprobs of ``response_ids`` after ``prompt_ids`` (temperature 1)."""
        ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=self.device)
        logits = self.policy(input_ids=ids).logits[:, :-1].float()
        lp = algos.gather_logprobs(logits, ids[:, 1:])[0, len(prompt_ids) - 1 :]
        return lp.tolist()

    def state(self) -> dict[str, float]:
        return {"version": self.version, "kl_coef": self.kl_ctl.value}

