"""The learner's weights out: the policy for the generation actors (``publish``) and the checkpoints an exact
resume needs (``save``, ``load_state``).

Methods of ``learner.learner.Learner`` (a mixin, as ``learner/offline_steps.py``): they use its policy, optimizer,
schedule, critic and distributed group. ``publish`` packs the policy under its Hugging Face names into one
object-store object, a buffer per dtype (``learner/weights.py``); a sharded group gathers it whole first, and
LoRA is merged.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from learner import distributed as D
from learner.weights import PackedWeights, pack_weights

STATE_FILE = "trainer_state.pt"
"""everything besides the Hugging Face weights that an exact resume needs (``Learner.save``)"""
ADAPTER_DIR = "adapter"
"""the LoRA adapters of a checkpoint, loadable with ``peft.PeftModel.from_pretrained``"""


class PolicyIO:
    """The policy out of the learner, as methods of ``Learner``: to the actors and to checkpoints."""

    @torch.no_grad()
    def _named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """The policy under its Hugging Face names, whole (gathered when sharded: every rank must call this;
        rank 0 gets them) and with LoRA merged: W + (alpha / r) B A."""
        if self.sharded:
            state = D.full_state(self.policy)
            return [(n, state[n]) for n in self.published] if self.dist.rank == 0 else []
        if self.lc.lora is None:
            return list(self.policy.named_parameters())
        base, out = self._base(), []
        for name, p in base.named_parameters():
            if "lora_" in name:
                continue
            if ".base_layer." in name:
                layer = base.get_submodule(name.rsplit(".base_layer.", 1)[0])
                merged = p.detach()
                if name.endswith(".weight"):
                    merged = merged + sum(layer.get_delta_weight(a) for a in layer.active_adapters)
                out.append((name.replace(".base_layer", ""), merged))
            else:
                out.append((name, p))
        return out

    def publish(self) -> tuple[int, list, dict[str, float]]:
        """Pack the policy under its Hugging Face names and ``ray.put`` it once (rank 0); returns ``[ref]``."""
        import ray

        start = time.perf_counter()
        self.version += 1
        named = self._named_weights() if self.sharded or self.dist.rank == 0 else []
        if self.dist.rank != 0:
            return self.version, [], {}
        gathered = time.perf_counter() - start
        packed: PackedWeights = pack_weights(named, self.version, self.publish_dtype, reuse=self._pack_buffers)
        ref = ray.put(packed)
        stats = {"sync/publish_seconds": time.perf_counter() - start, "sync/gather_seconds": gathered,
                 "sync/bytes": float(packed.nbytes)}
        return self.version, [ref], stats

    def save(self, path: str) -> str:
        """The policy in Hugging Face format (LoRA merged, the adapters beside it in ``adapter/``; the critic's
        too, for use elsewhere), plus ``trainer_state.pt``: optimizer, LR schedule, critic and its optimizer,
        value head, KL controller, version and every rank's RNG states, which is what ``load_state`` needs to
        continue exactly. A sharded group gathers everything whole (rank 0 writes it), so a checkpoint loads
        into any number of ranks. Every rank must call this."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        rngs = [rng]
        if self.dist.active:
            rngs = [None] * self.dist.world_size
            torch.distributed.all_gather_object(rngs, rng)
        weights = dict(self._named_weights()) if self.sharded or self.lc.lora is not None else None
        optimizer = D.optimizer_state(self.policy, self.optimizer)
        critic = None if self.critic is None else D.full_state(self.critic)
        critic_optimizer = None if self.critic is None else D.optimizer_state(self.critic, self.critic.optimizer)
        value_head = None if self.value_head is None else D.full_state(self.value_head)
        if self.dist.rank != 0:
            return path
        if weights is None:
            self.policy.save_pretrained(path, safe_serialization=True)
        else:
            self._base().save_pretrained(path, state_dict=weights, safe_serialization=True)
        if self.lc.lora is not None:
            self.policy.save_pretrained(str(Path(path) / ADAPTER_DIR))
        self.tokenizer.save_pretrained(path)
        if critic is not None:
            self.critic.save(f"{path}/critic", critic)
        if value_head is not None:
            torch.save(value_head, f"{path}/value_head.pt")
        torch.save({
            "strategy": "fsdp" if self.sharded else "replicated",
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "kl_coef": self.kl_ctl.value,
            "version": self.version,
            "bad_steps": self.bad_steps,
            "critic": critic,
            "critic_optimizer": critic_optimizer,
            "value_head": value_head,
            "rng": rngs,
        }, Path(path) / STATE_FILE)
        return path

    def load_state(self, path: str) -> int:
        """Continue from a ``save``d checkpoint whose policy this learner was built from; returns its version.
        Every rank calls it."""
        state = torch.load(Path(path) / STATE_FILE, weights_only=False, map_location="cpu")  # any device -> this one
        fmt = "fsdp" if self.sharded else "replicated"
        if state.get("strategy", "replicated") != fmt:
            raise ValueError(f"the checkpoint {path} holds {state['strategy']} optimizer state but this learner is "
                             f"{fmt} (learner.strategy, num_workers); resume with the strategy it was written with")
        D.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.kl_ctl.value = state["kl_coef"]
        self.version, self.bad_steps = state["version"], state["bad_steps"]
        if self.critic is not None:
            D.load_full_state(self.critic, state["critic"])
            D.load_optimizer_state(self.critic, self.critic.optimizer, state["critic_optimizer"])
        if self.value_head is not None:
            D.load_full_state(self.value_head, state["value_head"])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        rng = rngs[self.dist.rank % len(rngs)]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        return self.version

    def set_version(self, version: int) -> None:
        """Number the next published version after ``version`` (a learner restored while actors ran ahead)."""
        self.version = version
