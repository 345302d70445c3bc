"""The embedded default policy: tokenizer, tiny model, SFT and the checkpoint cache. No Ray, no vLLM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.data import AdditionConfig, DataConfig, make_addition
from learner import bootstrap
from learner.bootstrap import (
    SFT_REPORT,
    TinyModelConfig,
    build_tiny_model,
    build_tokenizer,
    ensure_default_policy,
)
from learner.sft import SFTConfig, completion_loss, cosine_with_warmup, encode_examples, greedy_accuracy, train_sft


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # On a shared 2-core machine, torch's 2-thread kernels spin against other processes and
    # run ~20x slower (measured: 126 s vs 6.6 s for the same 30 SFT steps); one thread is steady.
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_round_trips_and_splits_digits(tokenizer):
    ids = tokenizer.encode("23+58=81", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == ["2", "3", "+", "5", "8", "=", "8", "1"]
    assert tokenizer.decode(ids) == "23+58=81"
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "23+58=81"
    assert tokenizer.decode(tokenizer.encode("12345", add_special_tokens=False)) == "12345"
    assert len(tokenizer.encode("1234", add_special_tokens=False)) == 4


def test_tokenizer_specials(tokenizer):
    assert len(tokenizer) == 258
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    prompt_ids = tokenizer("7+8=", add_special_tokens=False)["input_ids"]
    assert prompt_ids == tokenizer.encode("7+8=", add_special_tokens=False)
    assert tokenizer.eos_token_id not in prompt_ids and tokenizer.bos_token_id not in prompt_ids


def test_tiny_model_forward_shape(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig())
    assert model.config.hidden_size // model.config.num_attention_heads == 64  # vLLM CPU attention needs 64
    assert next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(len(tokenizer), (3, 9))
    assert model(input_ids=ids).logits.shape == (3, 9, len(tokenizer))


def test_encode_examples_masks_prompt_and_padding(tokenizer):
    ids, mask, labels = encode_examples(tokenizer, [("1+2=", "3"), ("10+20=", "30")])
    eos = tokenizer.eos_token_id
    assert ids.shape == mask.shape == labels.shape == (2, 9)
    assert labels[0].tolist() == [-100] * 4 + [tokenizer.convert_tokens_to_ids("3"), eos] + [-100] * 3
    assert mask[0].tolist() == [1] * 6 + [0] * 3
    assert labels[1, -1].item() == eos and (labels[1, :6] == -100).all()


def test_completion_loss_ignores_masked_positions():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, -100, 3, 1], [-100, 2, -100, -100]])
    by_hand = torch.stack([
        -logits[0, 1].log_softmax(-1)[3],
        -logits[0, 2].log_softmax(-1)[1],
        -logits[1, 0].log_softmax(-1)[2],
    ]).mean()
    assert torch.allclose(completion_loss(logits, labels), by_hand)


def test_cosine_with_warmup_endpoints():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0)
    assert cosine_with_warmup(0, 0, 100) == pytest.approx(1.0)


def test_train_sft_lowers_loss(tokenizer):
    model = build_tiny_model(tokenizer, TinyModelConfig())
    train, held_out = make_addition(AdditionConfig(n_train=64, n_eval=16))
    stats = train_sft(
        model, tokenizer, [(r["prompt"], r["completion"]) for r in train],
        SFTConfig(steps=30, batch_size=32, warmup_steps=3),
        log=lambda _: None,
    )
    assert len(stats["sft/losses"]) == 30
    assert stats["sft/final_loss"] < 0.6 * stats["sft/first_loss"]
    assert 0.0 <= greedy_accuracy(model, tokenizer, [(r["prompt"], r["answer"]) for r in held_out], batch_size=8) <= 1


def test_ensure_default_policy_caches_and_reloads(tmp_path, monkeypatch, tokenizer):
    builds = []
    real_build = bootstrap._build_policy
    monkeypatch.setattr(bootstrap, "_build_policy", lambda *a: (builds.append(a[0]), real_build(*a)))
    sft_cfg = SFTConfig(steps=3, batch_size=16, warmup_steps=1)
    task = DataConfig(addition=AdditionConfig(n_train=64, n_eval=16))
    model_cfg = TinyModelConfig(num_layers=1)

    first = ensure_default_policy(tmp_path / "cache", sft_cfg, model_cfg, task, log=lambda _: None)
    second = ensure_default_policy(tmp_path / "cache", sft_cfg, model_cfg, task, log=lambda _: None)
    assert first == second and len(builds) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(("tiny", "."))] == [first.name]
    assert (first / "model.safetensors").is_file()
    report = json.loads((first / SFT_REPORT).read_text())
    assert 0.0 <= report["heldout_greedy_accuracy"] <= 1.0 and report["sft_seconds"] > 0

    other = ensure_default_policy(tmp_path / "cache", sft_cfg.model_copy(update={"seed": 1}), model_cfg, task,
                                  log=lambda _: None)
    assert other != first and len(builds) == 2

    model = AutoModelForCausalLM.from_pretrained(first)
    loaded_tok = AutoTokenizer.from_pretrained(first)
    assert loaded_tok.eos_token_id == loaded_tok.pad_token_id == tokenizer.eos_token_id
    assert loaded_tok.encode("23+58=81", add_special_tokens=False) == tokenizer.encode(
        "23+58=81", add_special_tokens=False
    )
    assert model.config.num_hidden_layers == 1 and model.config.vocab_size == len(tokenizer)
    held_out = make_addition(AdditionConfig(n_train=64, n_eval=16))[1]
    assert greedy_accuracy(model, loaded_tok, [(r["prompt"], r["answer"]) for r in held_out]) == pytest.approx(
        report["heldout_greedy_accuracy"]
    )


def test_interrupted_build_leaves_no_final_directory(tmp_path, monkeypatch):
    def boom(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(bootstrap, "_build_policy", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_policy(tmp_path, SFTConfig(steps=1), TinyModelConfig(), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []
