"""Preference pairs for offline optimisation (``relay dpo``): read from a file, or built from a policy's samples.

A record is ``{prompt, chosen, rejected}``: strings, or chat messages (a list of ``{role, content}``; the
prompt goes through the tokenizer's chat template with the generation prompt, a response is the content of
its last message). Every pair is checked; a bad one follows ``data.on_invalid`` (counted and skipped, or an
error) with a message naming the record: a missing field, an empty response, chosen equal to rejected, or a
pair longer than the context.

Built pairs (no file): the start policy samples ``dpo.policy_samples`` responses per training prompt, the
reward (the task's rule, or a reward model) scores them, and for every prompt with a best and a worse sample
the best is chosen over a worse one: correct against wrong on the embedded task, the policy's own mistakes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from core.data import DataError
from core.records import PreferencePair, RewardedSequence

FIELDS = {"pair": ("prompt", "chosen", "rejected"), "record": ("prompt", "response", "reward")}


def _text(value, field: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        return str(value[-1]["content"])
    raise ValueError(f"{where}: {field!r} must be a string or a list of chat messages {{role, content}}, "
                     f"got {type(value).__name__}")


def _prompt_text(value, tokenizer, where: str) -> str:
    if isinstance(value, list):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where}: the prompt is chat messages but the tokenizer has no chat template; give "
                             "the prompt as a string")
        return tokenizer.apply_chat_template(value, tokenize=False, add_generation_prompt=True)
    return _text(value, "prompt", where)


def _checked(rows: Sequence[dict], encode_one: Callable, what: str, on_invalid: str, skipped: dict[str, int] | None,
             where: str, log: Callable[[str], object]) -> list:
    """``encode_one(row, name, index)`` over ``rows``; a ``ValueError`` follows ``on_invalid``: a ``DataError``
    naming the record, or the record skipped and its reason counted in ``skipped``."""
    skipped = {} if skipped is None else skipped
    out = []
    for i, row in enumerate(rows):
        name = f"{where} record {i + 1}"
        try:
            missing = [f for f in FIELDS[what] if row.get(f) is None]
            if missing:
                raise ValueError(f"{name} has no {', '.join(map(repr, missing))} (a record needs "
                                 f"{', '.join(FIELDS[what])})")
            out.append(encode_one(row, name, len(out)))
        except ValueError as e:
            if on_invalid == "error":
                raise DataError(f"{e}; fix the record, or set data.on_invalid: skip to count and skip such "
                                f"{what}s") from None
            reason = str(e).split(": ", 1)[-1].split(" (")[0][:60]
            skipped[reason] = skipped.get(reason, 0) + 1
    if skipped:
        log(f"{where}: skipped {sum(skipped.values())} {what}s "
            f"({', '.join(f'{k}: {v}' for k, v in skipped.items())})")
    if not out:
        raise DataError(f"{where}: no valid {what} left ({sum(skipped.values())} skipped)")
    return out


def _encoder(tokenizer, max_length: int):
    """(prompt ids, response ids + EOS) of checked texts, refusing a record longer than ``max_length``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(name: str, prompt: str, *responses: str) -> tuple[list[int], ...]:
        if not prompt:
            raise ValueError(f"{name}: the prompt is empty")
        p = tokenizer.encode(prompt, add_special_tokens=False)
        rs = [tokenizer.encode(r, add_special_tokens=False) + eos for r in responses]
        longest = len(p) + max(len(r) for r in rs)
        if longest > max_length:
            raise ValueError(f"{name} is {longest} tokens, longer than the context ({max_length}); shorten it or "
                             "raise the context (model.tiny.max_position_embeddings / the model's)")
        return (p, *rs)

    return encode


def encode_pairs(rows: Sequence[dict], tokenizer, max_length: int, on_invalid: str = "error",
                 skipped: dict[str, int] | None = None, where: str = "preferences",
                 log: Callable[[str], object] = print) -> list[PreferencePair]:
    """Check and tokenise ``{prompt, chosen, rejected}`` rows (response tokens end with EOS). ``skipped`` counts
    the reasons of pairs skipped under ``on_invalid: skip``; under ``error`` the first bad pair raises
    ``DataError`` naming it."""
    encode = _encoder(tokenizer, max_length)

    def one(row: dict, name: str, index: int) -> PreferencePair:
        prompt = _prompt_text(row["prompt"], tokenizer, name)
        chosen, rejected = _text(row["chosen"], "chosen", name), _text(row["rejected"], "rejected", name)
        if not chosen.strip() or not rejected.strip():
            raise ValueError(f"{name}: the {'chosen' if not chosen.strip() else 'rejected'} response is empty")
        if chosen == rejected:
            raise ValueError(f"{name}: chosen and rejected are the same text ({chosen[:40]!r}); a pair must differ")
        return PreferencePair(*encode(name, prompt, chosen, rejected), index=index)

    return _checked(rows, one, "pair", on_invalid, skipped, where, log)


def pairs_from_samples(prompts: Sequence[str], metadatas: Sequence[dict], samples: Sequence[Sequence[str]],
                       scores: Sequence[Sequence[float]], seed: int = 0) -> list[dict]:
    """For each prompt whose samples did not all score the same: a best-scored sample is chosen over a
    lower-scored one (both at random among ties). ``samples[i]``/``scores[i]`` belong to ``prompts[i]``. An
    empty sample (the policy stopped at once) is left out: a pair needs two responses."""
    rng = random.Random(seed)
    pairs = []
    for prompt, meta, all_responses, all_rewards in zip(prompts, metadatas, samples, scores, strict=True):
        kept = [(r, s) for r, s in zip(all_responses, all_rewards, strict=True) if r.strip()]
        if not kept:
            continue
        responses, rewards = [r for r, _ in kept], [s for _, s in kept]
        best = max(rewards)
        top = [r for r, s in zip(responses, rewards, strict=True) if s == best]
        worse = [r for r, s in zip(responses, rewards, strict=True) if s < best and r not in top]
        if top and worse:
            pairs.append({"prompt": prompt, "chosen": rng.choice(top), "rejected": rng.choice(worse),
                          "metadata": meta})
    return pairs


def split_pairs_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out): a ``fraction`` of the distinct prompts and all their pairs held out."""
    prompts = sorted({str(r["prompt"]) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))])
    return [r for r in rows if str(r["prompt"]) not in held], [r for r in rows if str(r["prompt"]) in held]


def encode_rewarded(rows: Sequence[dict], tokenizer, max_length: int, on_invalid: str = "error",
                    skipped: dict[str, int] | None = None, where: str = "records",
                    log: Callable[[str], object] = print) -> list[RewardedSequence]:
    """Check and tokenise ``{prompt, response, reward}`` records for offline RWR, as ``encode_pairs`` does pairs:
    a missing field, an empty response, a reward that is not a finite number, or a record longer than the
    context follows ``on_invalid``, named."""
    encode = _encoder(tokenizer, max_length)

    def one(row: dict, name: str, index: int) -> RewardedSequence:
        prompt, response = _prompt_text(row["prompt"], tokenizer, name), _text(row["response"], "response", name)
        if not response.strip():
            raise ValueError(f"{name}: the response is empty")
        reward = row["reward"]
        if isinstance(reward, bool) or not isinstance(reward, int | float) or not math.isfinite(reward):
            raise ValueError(f"{name}: reward {reward!r} is not a finite number")
        p, r = encode(name, prompt, response)
        return RewardedSequence(p, r, float(reward), index=index)

    return _checked(rows, one, "record", on_invalid, skipped, where, log)
