"""vLLM worker extension that loads published weights in place.

vLLM mixes this class into its worker when the engine is built with
``worker_extension_cls="actors.vllm_ext.RelayWorkerExtension"``; the generation actor reaches
it through ``LLM.collective_rpc``. The engine runs in the actor's own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the tensors passed here are the zero-copy views
the actor rebuilt from the object store, not serialised copies.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RelayWorkerExtension:
    """Methods added to vLLM's worker. ``self`` is the worker."""

    def relay_load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Reload the model's weights in place from (Hugging Face name, tensor) pairs."""
        named = list(named)
        self.model_runner.reload_weights(weights_iterator=iter(named))
        self._relay_retie_lm_head()
        return len(named)

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
