"""The embedded default policy: a tiny Qwen2 with a tokenizer trained on the spot, warm-started by SFT.

No download: the tokenizer is a byte-level BPE trained here with no merges (256 byte tokens +
two specials), with digits split one per token so arithmetic sees one token per digit. The
model is a ~1.08M-parameter Qwen2 (hidden 128, 4 layers, 2 heads of dim 64, MLP 512, tied
embeddings). ``ensure_default_policy`` SFTs it on the addition task and saves a Hugging Face
checkpoint (safetensors) that transformers and vLLM both load, cached by a hash of the configs.

Simplifications, on purpose:
- The BPE has no merges: with digits split and a handful of symbols, merges would buy nothing.
- The cache key hashes the configs and ``FORMAT_VERSION``; bump the latter when the recipe
  changes in a way the configs do not show.
- The SFT default (440 steps) is chosen to land the policy at a low but non-zero held-out
  accuracy, so the RL stage has room to show learning. Measured here (batch 128, lr 1e-3,
  20 warmup steps, cosine, 4000 train / 500 held-out problems from make_problems(seed=0)):
  300 steps 7.2%, 360 11.4%, 400 9-10%, 440 16-17%, 480 18%. 440 steps take ~45 s on two idle
  cores; with other processes on the machine use one torch thread (two crawl, ~20x slower).
- The RL stage must draw its held-out set from the same ``make_problems(n_train, n_eval, seed)``
  call: a different n_train reshuffles the split and leaks SFT training problems into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from core.data import DataConfig, DataError, data_fingerprint, load_splits, sft_pairs
from learner.config import SFTConfig, TinyModelConfig
from learner.sft import greedy_accuracy, train_sft

FORMAT_VERSION = 1
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"  # declared for architectures that expect one; prompts never carry it
SFT_REPORT = "relay_sft.json"




def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges, digits one per token; ``<|endoftext|>`` is EOS and pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + 2,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["0123456789+-*=() "], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        padding_side="right",
        model_max_length=1 << 16,
    )


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig) -> Qwen2ForCausalLM:
    """A freshly initialised float32 Qwen2 sized by ``cfg`` over ``tokenizer``'s vocabulary."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"model.hidden_size {cfg.hidden_size} is not divisible by model.num_heads {cfg.num_heads}")
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config).float()


def policy_key(sft_cfg: SFTConfig, model_cfg: TinyModelConfig, data: DataConfig) -> str:
    """Stable short hash of everything that determines the saved policy (the data files' bytes included)."""
    blob = json.dumps(
        {"format": FORMAT_VERSION, "sft": sft_cfg.model_dump(), "model": model_cfg.model_dump(),
         "data": data_fingerprint(data)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_default_policy(
    cache_dir: Path,
    sft_cfg: SFTConfig | None = None,
    model_cfg: TinyModelConfig | None = None,
    data: DataConfig | None = None,
    log: Callable[[str], object] = print,
) -> Path:
    """Directory of the SFT-warm-started tiny policy, building it on the first call.

    The checkpoint (model + tokenizer, safetensors) and ``relay_sft.json`` (held-out greedy
    accuracy, SFT seconds, configs) are written into a temporary sibling and renamed into
    ``cache_dir/tiny-qwen2-<hash>``, so a directory under the final name is always complete.
    """
    sft_cfg = sft_cfg or SFTConfig()
    data = data or DataConfig()
    model_cfg = model_cfg or TinyModelConfig()
    cache_dir = Path(cache_dir)
    final = cache_dir / f"tiny-qwen2-{policy_key(sft_cfg, model_cfg, data)}"
    if (final / SFT_REPORT).is_file():
        log(f"default policy: cached at {final}")
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        _build_policy(tmp, final.name, sft_cfg, model_cfg, data, cache_dir, log)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / SFT_REPORT).is_file():  # not a concurrent builder that finished first
                raise
            log(f"default policy: another process built {final} first")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_policy(
    out: Path, name: str, sft_cfg: SFTConfig, model_cfg: TinyModelConfig, data: DataConfig, cache_dir: Path,
    log: Callable[[str], object],
) -> None:
    start = time.perf_counter()
    tokenizer = build_tokenizer()  # bytes, so it covers any text the data holds
    model = build_tiny_model(tokenizer, model_cfg)
    splits = load_splits(data, cache_dir, log=log)
    train = sft_pairs(splits.train, data, log=log)
    held_out = [p for p in sft_pairs(splits.main_eval, data.model_copy(update={"on_invalid": "skip"}), log=log)]
    longest = max(len(tokenizer.encode(p + c, add_special_tokens=False)) + 1 for p, c in train)
    if longest > model_cfg.max_position_embeddings:
        raise DataError(f"the longest SFT example has {longest} tokens (one per byte with the tiny model's "
                        f"tokenizer), more than model.tiny.max_position_embeddings="
                        f"{model_cfg.max_position_embeddings}; raise it (and generation.max_model_len) or shorten "
                        "the data")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"default policy: SFT of a {n_params / 1e6:.2f}M-param Qwen2 for {sft_cfg.steps} steps -> {name}")
    stats = train_sft(model, tokenizer, train, sft_cfg, log=log)
    accuracy = greedy_accuracy(model, tokenizer, held_out)
    log(f"default policy: held-out greedy accuracy {accuracy:.3f} after {stats['sft/seconds']:.1f} s of SFT")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    report = {
        "heldout_greedy_accuracy": accuracy,
        "n_heldout": len(held_out),
        "sft_seconds": stats["sft/seconds"],
        "build_seconds": time.perf_counter() - start,
        "final_loss": stats["sft/final_loss"],
        "n_params": n_params,
        "sft_config": sft_cfg.model_dump(),
        "data_config": data.model_dump(),
        "model_config": model_cfg.model_dump(),
    }
    (out / SFT_REPORT).write_text(json.dumps(report, indent=2) + "\n")


def read_sft_report(policy_dir: Path) -> dict:
    """The ``relay_sft.json`` written beside a policy by ``ensure_default_policy``."""
    return json.loads((Path(policy_dir) / SFT_REPORT).read_text())


def check_vllm_loads(policy_dir: Path, prompt: str = "23+58=", log: Callable[[str], object] = print) -> None:
    """Load ``policy_dir`` in vLLM (CPU) and in transformers; both greedy completions of ``prompt`` must agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # local: vLLM is heavy and optional here
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(policy_dir),
        dtype="float32",
        max_model_len=64,  # = max_position_embeddings
        kv_cache_memory_bytes=64 << 20,  # CPU default is 4 GiB (VLLM_CPU_KVCACHE_SPACE); 64 MiB = 16k tokens here
        seed=0,
    )
    log(f"vLLM engine start {time.perf_counter() - start:.1f} s")
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0].outputs[0]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    hf = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    hf_ids = hf[0, ids["input_ids"].shape[1] :].tolist()
    log(f"vLLM {prompt!r} -> {out.text!r} {list(out.token_ids)}; transformers -> {tokenizer.decode(hf_ids)!r} {hf_ids}")
    if list(out.token_ids) != hf_ids[: len(out.token_ids)]:
        raise AssertionError("vLLM and transformers greedy completions differ")


if __name__ == "__main__":
    # python -m learner.bootstrap [CACHE_DIR]: build (or reuse) the default policy, then check vLLM loads it.
    import sys

    torch.set_num_threads(1)  # 2 threads crawl when other processes share this machine's 2 cores
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    check_vllm_loads(ensure_default_policy(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/relay-policies")))
