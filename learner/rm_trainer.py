"""Offline reward-model training on preference pairs (Bradley-Terry).

``train_reward_model`` fits a scalar-head reward model (``reward_service.models.RewardModel``) on
JSONL pairs ``{prompt, chosen, rejected}`` with ``learner.algos.bradley_terry_loss``, logs train and
held-out pairwise accuracy each epoch, and saves a checkpoint directory that the reward service's
model deployment loads by path.

``make_synthetic_preferences`` builds pairs from the embedded arithmetic task: the correct sum is
preferred to a wrong one, half "close" (off by 1-2, or one digit changed) and half "clear" (a random
number or garbage). Simplifications: one pair per prompt (so a random split of pairs is a split of
prompts), no chat template, right truncation at ``max_length`` tokens.

CLI: ``python -m learner.rm_trainer OUT_DIR [--n-pairs N] [--epochs E]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cluster.tasks import make_problems
from learner.algos import bradley_terry_loss, pairwise_accuracy
from reward_service.config import RewardModelTrainConfig
from reward_service.models import RewardModel, join_text

PAIR_FIELDS = ("prompt", "chosen", "rejected")
_GARBAGE_CHARS = "abcdefghijklmnopqrstuvwxyz+=-*/?! "


def _close_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer near the right one: off by 1-2, or one digit replaced."""
    value = int(answer)
    if rng.random() < 0.5:
        return str(max(0, value + rng.choice([-2, -1, 1, 2])))
    i = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0")])
    return answer[:i] + digit + answer[i + 1:]


def _clear_miss(answer: str, rng: random.Random) -> str:
    """A plainly wrong answer: a random number or a garbage string."""
    if rng.random() < 0.5:
        while (guess := str(rng.randint(0, 999))) == answer:
            pass
        return guess
    return "".join(rng.choice(_GARBAGE_CHARS) for _ in range(rng.randint(1, 6))).strip() or "?"


def make_synthetic_preferences(n: int, seed: int = 0, digits: int = 2) -> list[dict]:
    """``n`` pairs {prompt, chosen, rejected, kind} on distinct ``a+b=`` prompts; kind is "close" or "clear"."""
    problems, _ = make_problems(n, 0, digits=digits, seed=seed)
    rng = random.Random(seed + 1)
    pairs = []
    for p in problems:
        close = rng.random() < 0.5
        rejected = _close_miss(p.answer, rng) if close else _clear_miss(p.answer, rng)
        pairs.append({"prompt": p.prompt, "chosen": p.answer, "rejected": rejected,
                      "kind": "close" if close else "clear"})
    return pairs


def load_preferences(path: str | Path) -> list[dict]:
    """Pairs from JSONL; every line needs string fields prompt, chosen, rejected (extra fields are kept)."""
    pairs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected an object with {list(PAIR_FIELDS)}, got {row!r:.80}")
            missing = [k for k in PAIR_FIELDS if not isinstance(row.get(k), str)]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing or non-string field(s) {missing}; "
                                 f"each line needs {list(PAIR_FIELDS)}")
            pairs.append(row)
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def _split(pairs: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(pairs) * eval_fraction))
    return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]


def _pair_rewards(model: RewardModel, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of chosen and rejected, each (B,), in one forward pass of 2B sequences."""
    texts = [join_text(r["prompt"], r["chosen"]) for r in rows] + [join_text(r["prompt"], r["rejected"]) for r in rows]
    batch, _ = model.encode(texts)
    rewards = model(**batch)  # (2B,)
    return rewards[: len(rows)], rewards[len(rows):]


@torch.inference_mode()
def evaluate(model: RewardModel, rows: list[dict], batch_size: int = 256) -> dict[str, float]:
    """Held-out Bradley-Terry loss and pairwise accuracy, overall and per ``kind`` when pairs have one."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(rows), batch_size):
        c, r = _pair_rewards(model, rows[i:i + batch_size])
        chosen.append(c)
        rejected.append(r)
    c, r = torch.cat(chosen), torch.cat(rejected)  # (N,), (N,)
    out = {"loss": bradley_terry_loss(c, r).item(), "accuracy": pairwise_accuracy(c, r).item()}
    for kind in sorted({row["kind"] for row in rows if "kind" in row}):
        idx = torch.tensor([row.get("kind") == kind for row in rows])
        out[f"accuracy_{kind}"] = pairwise_accuracy(c[idx], r[idx]).item()
    return out


def train_reward_model(cfg: RewardModelTrainConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Train, evaluate each epoch, save a checkpoint into ``out_dir``; returns the final ``rm/*`` metrics."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.torch_threads)
    pairs = load_preferences(cfg.preferences_path) if cfg.preferences_path else \
        make_synthetic_preferences(cfg.n_pairs, cfg.seed)
    train, held_out = _split(pairs, cfg.eval_fraction, cfg.seed)
    model = RewardModel.from_backbone(cfg.backbone, cfg.pooling, cfg.max_length)
    if cfg.freeze_embeddings:
        model.backbone.get_input_embeddings().requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
        {"params": model.head.parameters(), "lr": cfg.head_lr},
    ], weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train) / cfg.batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    rng = random.Random(cfg.seed)
    log(f"rm/start train_pairs={len(train)} held_out_pairs={len(held_out)} steps={steps} pooling={model.pooling}")
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        model.train()
        rng.shuffle(train)
        losses, accs = [], []
        for i in range(0, len(train), cfg.batch_size):
            chosen, rejected = _pair_rewards(model, train[i:i + cfg.batch_size])
            loss = bradley_terry_loss(chosen, rejected, cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            accs.append(pairwise_accuracy(chosen, rejected).item())
        held = evaluate(model, held_out)
        metrics = {"rm/epoch": epoch + 1, "rm/train_loss": sum(losses) / len(losses),
                   "rm/train_accuracy": sum(accs) / len(accs), "rm/first_step_loss": losses[0] if epoch == 0
                   else metrics["rm/first_step_loss"], "rm/train_time_s": time.perf_counter() - start}
        metrics.update({f"rm/eval_{k}": v for k, v in held.items()})
        log(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    model.eval()
    model.save_pretrained(out_dir)
    log(f"rm/saved {out_dir}")
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-pairs", type=int, default=RewardModelTrainConfig.model_fields["n_pairs"].default)
    parser.add_argument("--epochs", type=int, default=RewardModelTrainConfig.model_fields["epochs"].default)
    parser.add_argument("--preferences", default=None, help="JSONL of {prompt, chosen, rejected}")
    args = parser.parse_args()
    cfg = RewardModelTrainConfig(n_pairs=args.n_pairs, epochs=args.epochs, preferences_path=args.preferences)
    print(json.dumps(train_reward_model(cfg, args.out_dir), indent=1))


if __name__ == "__main__":
    main()
