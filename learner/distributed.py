"""What a learner rank needs to train with the others: the process group, sums over ranks, and the strategy.

A learner group (``learner/group.py``) is M learner actors that form one torch.distributed group: gloo on
CPU, NCCL on GPU, with a timeout so that a dead rank fails the step instead of hanging a collective.

Strategies (``learner.strategy``):
- ``ddp``: every rank holds the whole model; after the micro-batches of an optimizer step the gradients
  are summed over ranks in flat buckets (one all-reduce per bucket) before clipping, so every rank takes
  the same step. The loss is already normalised by the global token (or sequence) count, hence a sum,
  not a mean. Unlike torch's DDP wrapper the all-reduce does not overlap the backward pass.
- ``fsdp``: PyTorch's FSDP2 ``fully_shard`` on every decoder layer and the root, so parameters, gradients
  and Adam's state are sharded over ranks (optionally offloaded to CPU memory); the frozen reference and
  the critic are sharded the same way. FSDP's reduce-scatter averages over ranks, so a sharded learner
  scales its losses by the number of ranks (a divide factor of 1 needs PREMUL_SUM, which gloo lacks).

One process (M = 1) is the same code with every collective a no-op.
"""

from __future__ import annotations

import datetime
import socket
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist

BUCKET_BYTES = 64 << 20  # gradients summed per all-reduce
# On CPU, rows up to this many tokens attend with PyTorch's math kernel, not its flash kernel, whose backward is
# the slower of the two there for short rows. Forward + backward, bfloat16, 8192 tokens, 8 heads of 64, 2 threads
# (measured 2026-12-06): math / flash = 0.31 at 16-token rows, 0.70 at 134, about 0.9 at 128-160, 1.3-1.4 at 192,
# 1.6 at 256, 4.0 at 2048; one learner step of the generation-heavy benchmark (134-token rows): 8.97 s against 9.60.
CPU_MATH_ATTENTION_MAX = 160


def autocast(mode: str, device: torch.device) -> AbstractContextManager:
    """The precision of the forward passes (``learner.mixed_precision``). ``bf16``: mixed precision (Micikevicius
    et al. 2018) with bfloat16, whose float32 exponent range needs no loss scaling: matmuls run in bfloat16 under
    ``torch.autocast`` while the weights, gradients and AdamW state stay float32. ``none``: the weights' own dtype."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if mode == "bf16" else nullcontext()


def attention_kernel(device: torch.device, width: int, checkpointed: bool = False) -> AbstractContextManager:
    """The scaled-dot-product attention kernel for a forward pass over rows of ``width`` tokens: on CPU the math
    kernel up to ``CPU_MATH_ATTENTION_MAX`` tokens, otherwise PyTorch's own choice (flash or memory-efficient
    attention, whose memory does not grow with the square of the width). The backward pass runs the kernel the
    forward pass chose. ``checkpointed`` (gradient checkpointing): the backward pass runs the forward again
    outside this context, which must pick the same kernel, so PyTorch's choice is kept."""
    if not checkpointed and device.type == "cpu" and width <= CPU_MATH_ATTENTION_MAX:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    return nullcontext()


@contextmanager
def forward_pass(lc, device: torch.device | str, width: int):
    """The context of a forward pass of the learner's models (policy, reference, critic; ``lc`` the
    ``LearnerConfig``) over rows of ``width`` tokens: its precision and its attention kernel. ``device``: a
    device or its name (the critic is called with either)."""
    device = torch.device(device)
    with autocast(lc.mixed_precision, device), attention_kernel(device, width, lc.gradient_checkpointing):
        yield


def free_port() -> tuple[str, int]:
    """This node's address and a free TCP port: rank 0's rendezvous (run on rank 0's bundle)."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class Collective:
    """The ranks of one learner group; with ``world_size`` 1 every operation returns its input."""

    def __init__(self, rank: int = 0, world_size: int = 1, address: str | None = None, device=None,
                 timeout_s: float = 600.0):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        if world_size > 1:
            # NCCL for the GPU collectives, gloo beside it for CPU tensors (FSDP's CPU offload clips on CPU)
            backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of ``t`` over ranks (a new tensor; ``t`` is left alone)."""
        if not self.active:
            return t
        out = t.detach().clone().to(self.device)
        dist.all_reduce(out)
        return out.to(t.device)

    def all_max(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.active or not values:
            return values
        return self.all_sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of replicated ``params`` over ranks (ddp), in flat buckets of ``BUCKET_BYTES``."""
        if not self.active:
            return
        for p in params:  # a rank that ran no micro-batch has no gradients yet: it adds zeros
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        bucket, size = [], 0
        for g in grads:
            bucket.append(g)
            size += g.numel() * g.element_size()
            if size >= BUCKET_BYTES:
                _all_reduce_flat(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_flat(bucket)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def _all_reduce_flat(grads: list[torch.Tensor]) -> None:
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, summed in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(summed)


# ---- FSDP2 -----------------------------------------------------------------------------------------------
def shard(model: torch.nn.Module, offload: bool = False) -> torch.nn.Module:
    """``fully_shard`` each transformer block, then the whole model (FSDP2), in place."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    policy = CPUOffloadPolicy() if offload else OffloadPolicy()
    for block in _blocks(model):
        fully_shard(block, offload_policy=policy)
    fully_shard(model, offload_policy=policy)
    return model


def compile_blocks(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``), the blocks ``shard`` shards. The
    layers share one forward, so one graph serves them all (PyTorch inlines their parameters as inputs); the
    embedding, the head and the loss stay eager. A new width recompiles once, then shapes are dynamic."""
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"learner.compile: found no decoder layers (a `layers` ModuleList) in "
                         f"{type(model).__name__}; set learner.compile=false for this model")
    for block in blocks:
        block.compile()


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a Hugging Face model (``model.layers`` / ``layers``), whatever wraps them."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return list(layers)
    return []


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on CPU: gathered from the shards on rank 0 (empty on the others), or as it is."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state, gathered whole (keyed by parameter name) when ``model`` is sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def local_bytes(tensors) -> int:
    """Bytes this rank holds of ``tensors`` (its shard of a sharded tensor)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total
