"""vLLM worker extension that loads published weights in place.

vLLM mixes this class into its worker when the engine is built with
``worker_extension_cls="actors.vllm_ext.RelayWorkerExtension"``; the generation actor reaches
it through ``LLM.collective_rpc``. The engine runs in the actor's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the tensors passed here are the zero-copy views
the actor rebuilt from the object store, not serialised copies.

Two ways in. vLLM's layerwise ``reload_weights`` works for any model, but on CPU it re-runs its whole
loading machinery per layer: 17-19 ms a swap for the 1.1M-parameter default, while generation waits (6 ms
direct, measured in one process, the two alternating). For the
architectures in ``DIRECT`` on one CPU rank without quantisation the swap is a plan built once: each
Hugging Face tensor goes to the parameter (or the slice of a stacked q/k/v or gate/up parameter) vLLM's
loader would put it in, copied in place; only the layers whose CPU GEMM packs its weight (oneDNN) are
packed again, by vLLM's own ``process_weights_after_loading``. Anything else takes the layerwise reload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

DIRECT = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"})
"""architectures whose vLLM ``load_weights`` is, for one unquantised rank, a copy per tensor, q/k/v and gate/up
stacked where the model's ``hf_to_vllm_mapper`` says: the direct load does exactly that"""


@dataclass
class _Target:
    module: torch.nn.Module
    attr: str  # "weight" or "bias"
    parts: list[str]  # Hugging Face names, stacked in this order along dim 0
    repack: bool  # the layer's CPU GEMM holds a packed copy: rebuild it after the copy
    shape: tuple[int, ...] = ()
    padded: bool = False  # a vocabulary embedding: the rows past the tokenizer's vocabulary stay zero


class RelayWorkerExtension:
    """Methods added to vLLM's worker. ``self`` is the worker."""

    def relay_load_weights(self, named: Iterable[tuple[str, torch.Tensor]], layerwise: bool = False) -> str:
        """Reload the model's weights in place from (Hugging Face name, tensor) pairs; which load it took
        ("direct" or "layerwise", which ``layerwise`` forces)."""
        named = list(named)
        plan = None if layerwise else self._relay_direct_plan([name for name, _ in named])
        if plan is None:
            self.model_runner.reload_weights(weights_iterator=iter(named))
            self._relay_retie_lm_head()
            return "layerwise"
        _load_direct(plan, dict(named))
        return "direct"

    def relay_prepare_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> Prepared | None:
        """The part of a direct load that can run beside generation (``_prepare``), for ``relay_install_weights``
        to finish between requests; None where the load is layerwise (``relay_load_weights`` then does it all)."""
        named = list(named)
        plan = self._relay_direct_plan([name for name, _ in named])
        return None if plan is None else _prepare(plan, dict(named))

    def relay_install_weights(self, prepared: Prepared) -> str:
        """Install what ``relay_prepare_weights`` built (between requests); the load's kind, as relay_load_weights."""
        _install(prepared)
        return "direct"

    def _relay_direct_plan(self, names: list[str]) -> list[_Target] | None:
        """The direct load's plan for these names (built once, kept while the names stay the same), or None
        where the layerwise reload must do it."""
        key = tuple(names)
        cached = getattr(self, "_relay_plan", None)
        if cached is None or cached[0] != key:
            self._relay_plan = (key, _direct_plan(self.model_runner, names))
        return self._relay_plan[1]

    def _relay_retie_lm_head(self) -> None:
        # The layerwise reload gives embed_tokens a new Parameter, which unties a tied
        # lm_head: it would keep the old weight (and, on CPU, the GEMM packed from it), so
        # logits would come from the previous version. Tie again and re-run its processing.
        model = self.model_runner.get_model()
        hf_config = self.model_runner.model_config.hf_config
        if not getattr(hf_config, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
            return
        model.lm_head.weight = model.model.embed_tokens.weight
        model.lm_head.quant_method.process_weights_after_loading(model.lm_head)


def _direct_plan(runner, names: list[str]) -> list[_Target] | None:
    """Where each named tensor goes, or None unless every parameter of the model is covered exactly once by
    a supported architecture on one unquantised CPU rank."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.platforms import current_platform

    model, config = runner.get_model(), runner.vllm_config
    if (type(model).__name__ not in DIRECT or not current_platform.is_cpu() or config.quant_config is not None
            or config.parallel_config.world_size != 1 or config.lora_config is not None):
        return None
    tied = getattr(runner.model_config.hf_config, "tie_word_embeddings", False)
    params = dict(model.named_parameters(remove_duplicate=False))
    parts: dict[str, dict[int, str]] = {}  # vLLM parameter -> {position in the stack: Hugging Face name}
    stacked = set()
    for hf_name, (name, shard) in _vllm_names(getattr(model, "hf_to_vllm_mapper", None), names).items():
        if tied and name == "lm_head.weight":
            continue  # the same tensor as embed_tokens.weight
        index = _SHARD_INDEX.get(shard, shard)
        if name not in params or not isinstance(index, int) or index in parts.setdefault(name, {}):
            return None
        parts[name][index] = hf_name
        if shard is not None:
            stacked.add(name)
    plan = []
    for name, param in params.items():
        if tied and name == "lm_head.weight":
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        got = parts.get(name, {})
        want = len(getattr(module, "output_sizes", None) or ()) if name in stacked else 1
        if sorted(got) != list(range(want)) or want == 0:
            return None  # a parameter the names do not cover, or a stacked one only in part
        shape, padded = tuple(param.shape), isinstance(module, VocabParallelEmbedding)
        if padded:  # vLLM pads the vocabulary; the loader fills the leading rows and zeroes the rest
            shape = (module.org_vocab_size, *shape[1:])
        if param.numel() == 0:  # dropped after packing: the shape vLLM's loader would have filled
            if not hasattr(module, "output_partition_sizes") or not hasattr(module, "input_size_per_partition"):
                return None
            shape = (sum(module.output_partition_sizes), module.input_size_per_partition)
        plan.append(_Target(module, attr, [got[i] for i in range(want)],
                            repack=attr == "weight" and hasattr(module, "cpu_linear"), shape=shape, padded=padded))
    if tied and hasattr(model, "lm_head") and hasattr(model.lm_head, "cpu_linear"):
        plan.append(_Target(model.lm_head, "weight", [], repack=True))  # packed from the embedding, again
    return plan


_SHARD_INDEX = {None: 0, "q": 0, "k": 1, "v": 2}
"""stack positions of vLLM's shard ids; gate/up shards are already 0 and 1"""


class _Tag:
    """Stands in for a tensor in ``WeightsMapper.apply``, which sets ``shard_id`` on what it stacks."""

    shard_id = None

    def detach(self) -> _Tag:
        return _Tag()


def _vllm_names(mapper, names: list[str]) -> dict[str, tuple[str, object]]:
    """Hugging Face name -> (vLLM parameter name, shard id or None), as the model's own loader maps it; a name
    the mapper drops or splits over several parameters is left out, so the plan finds it uncovered."""
    if mapper is None:
        return {n: (n, None) for n in names}
    out = {}
    for n in names:
        mapped = list(mapper.apply([(n, _Tag())]))
        if len(mapped) == 1:
            out[n] = (mapped[0][0], mapped[0][1].shard_id)
    return out


class _Shadow:
    """Stands in for a linear layer while vLLM's ``process_weights_after_loading`` packs a new weight for its CPU
    GEMM beside generation: it gets the weight, and ``cpu_linear`` the packing sets (``_cpu_skip_gemm_dispatch``
    copied from the layer, so the method takes the layer's own path)."""

    def __init__(self, module: torch.nn.Module, weight: torch.Tensor):
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None  # the layer's own bias is copied in place when the packing is installed
        self._cpu_skip_gemm_dispatch = getattr(module, "_cpu_skip_gemm_dispatch", False)


@dataclass
class Prepared:
    """A version ready to install: per plan target its new value, and for a packed layer the packing built aside."""

    steps: list[tuple[_Target, torch.Tensor | None, _Shadow | None]]


@torch.no_grad()
def _prepare(plan: list[_Target], tensors: dict[str, torch.Tensor]) -> Prepared:
    """Everything of a direct load that need not stop generation: the shapes checked (a refused load leaves the
    engine as it was) and every packed layer's new packing built on a stand-in. The packing is most of a load
    (oneDNN reorders each weight), so a background fetch runs this and the swap between requests only installs."""
    for t in plan:
        if t.parts:
            parts = [tensors[name].shape for name in t.parts]
            shape = (sum(p[0] for p in parts), *parts[0][1:]) if len(parts) > 1 else tuple(parts[0])
            if shape != t.shape or any(p[1:] != parts[0][1:] for p in parts):
                raise ValueError(f"{', '.join(t.parts)}: shape {[tuple(p) for p in parts]}, the engine's {t.attr} "
                                 f"is {t.shape}; the published weights are not of the model this engine was built "
                                 f"from")
    steps, embedding = [], None
    for t in plan:
        param = getattr(t.module, t.attr)
        if not t.parts:  # lm_head tied to the embedding: packed from the embedding as it will be once installed
            steps.append((t, None, _packed(t.module, embedding)))
            continue
        new = [tensors[name] for name in t.parts]
        value = torch.cat(new) if len(new) > 1 else new[0]
        if t.padded:  # the padded rows past the tokenizer's vocabulary stay zero
            full = torch.zeros(param.shape, dtype=param.dtype)
            full[:value.shape[0]] = value
            embedding = full
        steps.append((t, value, _packed(t.module, embedding if t.padded else value.to(param.dtype, copy=len(new) == 1))
                      if t.repack else None))
    return Prepared(steps)


def _packed(module: torch.nn.Module, weight: torch.Tensor) -> _Shadow:
    """``module``'s GEMM packed from ``weight`` (a tensor of this load's own: vLLM may keep it) on a stand-in."""
    shadow = _Shadow(module, weight)
    module.quant_method.process_weights_after_loading(shadow)
    return shadow


@torch.no_grad()
def _install(prepared: Prepared) -> None:
    """Put a prepared version in place: copies of the unpacked tensors (norms, biases, the embedding) and the new
    packings' GEMMs. Run between requests: the engine's weights change only there."""
    for t, value, shadow in prepared.steps:
        param = getattr(t.module, t.attr)
        if value is not None and param.numel() > 0:  # a packed layer whose GEMM still reads its weight keeps it too
            if t.padded:
                param[:value.shape[0]].copy_(value)
                param[value.shape[0]:].zero_()
            else:
                param.copy_(value)
        if shadow is not None:
            t.module.cpu_linear = shadow.cpu_linear
            t.module._relay_packed = shadow  # whatever the packing holds lives as long as it is installed


def _load_direct(plan: list[_Target], tensors: dict[str, torch.Tensor]) -> None:
    _install(_prepare(plan, tensors))
