"""The learner's steps for the offline trainers (``cluster/offline.py``): preference optimisation (DPO, IPO,
cDPO) on pairs, reward-weighted regression on rewarded samples, and greedy responses for their held-out
evaluation.

Methods of ``learner.learner.Learner`` (a mixin, so that a learner group's actors have them): they use its
policy, forward pass, token-budget micro-batches, optimizer and ``_apply_step``. Every rank calls each of them,
so the ranks of a sharded group run the same forward passes (a rank with no rows left runs an empty one).
"""

from __future__ import annotations

import torch

from core.records import PreferencePair, RewardedSequence
from learner import losses
from learner.batch import RolloutBatch, collate_pairs, collate_rewarded, token_budget_split


class OfflineSteps:
    """The offline trainers' steps, as methods of ``Learner``."""

    # ---- preference optimisation (DPO, IPO, cDPO) -------------------------------------------------
    def _pair_plan(self, batch: RolloutBatch, n: int) -> list[torch.Tensor]:
        """Token-budget micro-batches of pairs (a pair's chosen and rejected rows always together: the loss is
        per pair); each entry lists the pairs' rows, chosen then rejected."""
        lengths = batch.lengths()
        longest = torch.maximum(lengths[:n], lengths[n:])
        micro = token_budget_split(longest, torch.arange(n), max(self.lc.micro_batch_tokens // 2, 1))
        if self.sharded:
            micro += [torch.arange(0)] * (int(self.dist.all_max(len(micro))) - len(micro))
        return [torch.cat([m, m + n]) for m in micro]

    def _pair_logps(self, micro: RolloutBatch, length_normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-probs (summed over response tokens, or their mean) of a micro-batch's chosen and rejected."""
        logprobs, _, _ = self._token_logprobs(self.policy, micro)
        seq = losses.sequence_logprobs(logprobs, micro.response_mask.to(self.device), length_normalize)
        k = len(micro) // 2
        return seq[:k], seq[k:]

    @torch.no_grad()
    def pair_logprobs(self, pairs: list[PreferencePair], length_normalize: bool = False,
                      width: int | None = None) -> list[tuple[float, float]]:
        """log pi(chosen | prompt), log pi(rejected | prompt) per pair under the policy as it is now: before
        training, the frozen reference's, computed once and cached (TRL's ``precompute_ref_log_probs``)."""
        out = [(0.0, 0.0)] * len(pairs)
        batch = collate_pairs(pairs, self.pad_id, width) if pairs else collate_pairs([], self.pad_id, width or 2)
        for rows in self._pair_plan(batch, len(pairs)):
            if not len(rows):
                self._empty_pass(train=False)
                continue
            chosen, rejected = self._pair_logps(batch.select(rows), length_normalize)
            for j, i in enumerate(rows[: len(rows) // 2].tolist()):
                out[i] = (chosen[j].item(), rejected[j].item())
        return out

    def preference_step(self, pairs: list[PreferencePair], reference: list[tuple[float, float]], cfg,
                        train: bool = True, width: int | None = None) -> dict[str, float]:
        """One optimizer step of ``cfg.loss`` (a ``DPOConfig``) on this rank's pairs, whose reference log-probs are
        ``reference``; ``train=False`` only measures (held-out pairs). The loss is the mean over all ranks' pairs.
        Returns ``offline/*``: loss, the implicit rewards beta * (log pi - log ref) of chosen and rejected, their
        margin and the preference accuracy (chosen's implicit reward above rejected's)."""
        loss_type = {"dpo": "sigmoid", "cdpo": "sigmoid", "ipo": "ipo"}[cfg.loss]
        smoothing = cfg.label_smoothing if cfg.loss == "cdpo" else 0.0
        n = len(pairs)
        n_total = max(self.dist.sum_floats([float(n)])[0], 1.0)
        batch = collate_pairs(pairs, self.pad_id, width) if pairs else collate_pairs([], self.pad_id, width or 2)
        ref = torch.tensor(reference, dtype=torch.float32, device=self.device).reshape(-1, 2)
        scale = float(self.dist.world_size) if self.sharded else 1.0
        sums = dict.fromkeys(("loss", "chosen_reward", "rejected_reward", "margin", "accuracy"), 0.0)
        self._train_mode(train)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
        for rows in self._pair_plan(batch, n):
            if not len(rows):
                self._empty_pass(train)
                continue
            idx = rows[: len(rows) // 2].to(self.device)
            with torch.enable_grad() if train else torch.no_grad():
                chosen, rejected = self._pair_logps(batch.select(rows), cfg.length_normalize)
                loss, r_chosen, r_rejected = losses.dpo_loss(chosen, rejected, ref[idx, 0], ref[idx, 1], beta=cfg.beta,
                                                             label_smoothing=smoothing, loss_type=loss_type)
            w = len(idx) / n_total
            if train:
                (loss * w * scale).backward()
            parts = {"loss": loss, "chosen_reward": r_chosen.mean(), "rejected_reward": r_rejected.mean(),
                     "margin": (r_chosen - r_rejected).mean(), "accuracy": (r_chosen > r_rejected).float().mean()}
            for key, value in parts.items():
                sums[key] += value.item() * w
        self._train_mode(False)
        out = dict(zip(sums, self.dist.sum_floats(list(sums.values())), strict=True))
        stats = {f"offline/{k}": v for k, v in out.items()}
        if train:
            stats.update(self._apply_step(out["loss"]))
        return stats

    def weighted_nll_step(self, samples: list[RewardedSequence], weights: list[float], train: bool = True,
                          width: int | None = None) -> dict[str, float]:
        """Offline reward-weighted regression (Peters & Schaal 2007): one step on loss = -sum_i w_i log pi(y_i | x_i)
        / N over all ranks' N samples, log pi summed over the response tokens; ``weights`` (this rank's) come from
        ``losses.rwr_weights`` over the whole batch. ``train=False`` only measures. Returns ``offline/loss`` and
        ``offline/nll`` (the unweighted mean negative log-likelihood)."""
        n = len(samples)
        n_total = max(self.dist.sum_floats([float(n)])[0], 1.0)
        batch = collate_rewarded(samples, self.pad_id, width) if samples else collate_rewarded([], self.pad_id,
                                                                                               width or 2)
        w = torch.tensor(weights, dtype=torch.float32, device=self.device).reshape(-1)
        scale = float(self.dist.world_size) if self.sharded else 1.0
        sums = {"loss": 0.0, "nll": 0.0}
        self._train_mode(train)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
        for idx in self._plan(batch, torch.arange(n)):
            if not len(idx):
                self._empty_pass(train)
                continue
            micro = batch.select(idx)
            with torch.enable_grad() if train else torch.no_grad():
                logprobs, _, _ = self._token_logprobs(self.policy, micro)
                seq = losses.sequence_logprobs(logprobs, micro.response_mask.to(self.device))
                loss = -(w[idx.to(self.device)] * seq).sum() / n_total
            if train:
                (loss * scale).backward()
            sums["loss"] += loss.item()
            sums["nll"] += -seq.sum().item() / n_total
        self._train_mode(False)
        stats = {f"offline/{k}": v for k, v in zip(sums, self.dist.sum_floats(list(sums.values())), strict=True)}
        if train:
            stats.update(self._apply_step(stats["offline/loss"]))
        return stats

    @torch.no_grad()
    def greedy_responses(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions with Hugging Face ``generate`` (held-out evaluation of an offline run); every rank
        calls it, so sharded ranks run the same forward passes."""
        from learner.sft import greedy_responses

        return greedy_responses(self.policy, self.tokenizer, prompts, max_new_tokens)
