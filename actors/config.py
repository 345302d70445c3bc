"""The generation actors' configuration section (pydantic; imports no torch, vLLM or Ray)."""

from __future__ import annotations

from pydantic import Field, model_validator

from core.section import Section


class GenerationConfig(Section):
    num_actors: int = Field(2, ge=1, description="vLLM generation actors; prompts are sharded across them. 2 suits "
                            "the 2-core default: one single-thread engine per core samples a batch about 1.4x as fast "
                            "as one engine with 2 threads (measured, benchmarks/bench_loop.py)")
    max_num_actors: int | None = Field(None, ge=1, description="grow the fleet up to this many actors while the "
                                       "job runs, one whenever the cluster has room (a node joined); null = num_actors")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per generation actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor (= tensor_parallel_size on GPUs)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree (GPU only)")
    samples_per_prompt: int = Field(8, ge=1, description="responses per prompt (the GRPO group size)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(6, ge=1, description="maximum response tokens")
    min_tokens: int = Field(0, ge=0, description="sampled responses: no end-of-sequence before this many tokens "
                            "(vLLM's min_tokens; fixed-length responses for benchmarks; the learner masks it too, so "
                            "its logprobs are the sampler's); greedy evaluation ignores it")
    max_model_len: int = Field(64, ge=8, description="prompt + response token limit of the engine")
    kv_cache_gb: int = Field(1, ge=1, description="CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM GPU memory share (GPU only)")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences an engine runs at once (vLLM's "
                                     "max_num_seqs); a call's samples beyond it wait for a second wave. null = vLLM's "
                                     "default (256 on CPU, 1024 on an H100)")
    enforce_eager: bool = Field(True, description="skip CUDA graph capture / compilation (faster start)")
    stream_chunk_prompts: int | None = Field(None, ge=1, description="streaming loop (algorithm.max_staleness >= 1): "
                                             "prompts per generate launch, each on one actor; every actor keeps two "
                                             "launches in flight and weights are swapped in between them. null = "
                                             "train.prompts_per_step / (2 x generation.num_actors)")
    partial_rollouts: bool = Field(False, description="streaming loop: sample in segments of partial_segment_tokens; "
                                   "between segments a newly published version is swapped in and unfinished samples "
                                   "continue from their prefix; each token records its version (token_versions)")
    partial_segment_tokens: int = Field(16, ge=1, description="partial_rollouts: tokens per segment, the longest a "
                                        "new version waits for an actor")
    block_size: int | None = Field(None, ge=1, description="KV-cache block size in tokens (vLLM's); prefix caching "
                                   "reuses whole blocks only. null = 32 on CPU with partial_rollouts, so a segment "
                                   "recomputes under a block of its prefix (vLLM's CPU default, 128, caches nothing of "
                                   "a shorter prefix), else vLLM's default (128 on CPU, 16 on GPU). CPU attention "
                                   "takes multiples of 32")
    torch_threads: int | None = Field(None, ge=1, description="CPU engine threads; null = num_cpus rounded (1 in "
                                      "the default, one engine per core)")
    seed: int = Field(0, description="sampling seed of actor 0 (actor i uses seed + i)")
    timeout_s: float = Field(300.0, gt=0, description="deadline of one generate or weight-load call, seconds; an actor "
                             "that misses it is killed, restarted and caught up")
    start_timeout_s: float = Field(300.0, gt=0, description="deadline for an engine to start or restart, seconds; an "
                                   "actor whose restart misses it (its node is gone) is retired")
    max_restarts: int = Field(2, ge=0, description="times Ray restarts a crashed generation actor")

    @model_validator(mode="after")
    def _lengths(self) -> GenerationConfig:
        if self.max_tokens >= self.max_model_len:
            raise ValueError(f"generation.max_tokens ({self.max_tokens}) must be less than generation.max_model_len "
                             f"({self.max_model_len}), which holds the prompt and the response; lower max_tokens or "
                             "raise max_model_len")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"generation.min_tokens ({self.min_tokens}) is above generation.max_tokens "
                             f"({self.max_tokens}); lower min_tokens or raise max_tokens")
        if self.min_tokens and self.partial_rollouts:
            raise ValueError("generation.min_tokens applies to whole responses and partial_rollouts samples in "
                             "segments; use one or the other")
        return self

    @model_validator(mode="after")
    def _sizes(self) -> GenerationConfig:
        if self.block_size is not None and self.num_gpus == 0 and self.block_size % 32:
            raise ValueError(f"generation.block_size ({self.block_size}) must be a multiple of 32 on CPU (vLLM's CPU "
                             "attention); use 32 or 64, or null")
        if self.max_num_actors is not None and self.max_num_actors < self.num_actors:
            raise ValueError(f"generation.max_num_actors ({self.max_num_actors}) is below generation.num_actors "
                             f"({self.num_actors}); set it to at least num_actors, or null")
        return self

    @property
    def engine_block_size(self) -> int | None:
        """The KV-cache block size given to vLLM; None: vLLM's own. Partial rollouts continue every unfinished
        sample from its prefix, of which prefix caching reuses the whole blocks: on CPU the smallest block there."""
        if self.block_size is None and self.partial_rollouts and self.num_gpus == 0:
            return 32
        return self.block_size

    @property
    def engine_threads(self) -> int:
        """Torch threads each engine runs with on CPU."""
        return self.torch_threads or max(1, round(self.num_cpus))
