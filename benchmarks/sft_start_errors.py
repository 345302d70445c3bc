"""What an SFT start gets wrong on the embedded addition task: the error structure of its sampled answers.

RL from a start can only sharpen what the start's samples already contain. This samples K answers per training
prompt at RL's temperature (1.0) and sorts each into: correct, only the units digit wrong, both digits wrong,
units right but the rest wrong, wrong length, not a number. It also prints how many groups of K hold at least
one correct sample (the groups GRPO learns from) and how often the units digit is right against chance (1/10).

    python benchmarks/sft_start_errors.py SFT_DIR [SFT_DIR ...] [--prompts 400] [--samples 8]

SFT_DIR is a policy checkpoint, e.g. ``<run_dir>/sft`` of ``relay pipeline``. One thread, about 10 s a start.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch

from core.data import exact_match
from learner.rm_trainer import addition_problems, load_policy, sample_responses

KINDS = ("correct", "units digit wrong only", "both digits wrong", "units right, rest wrong", "wrong length",
         "not a number")


def classify(response: str, answer: str) -> str:
    if exact_match(response, answer):  # the task's own rule, as the reward judges it
        return "correct"
    r = response.strip()
    if not r.isdigit():
        return "not a number"
    if len(r) != len(answer):
        return "wrong length"
    if r[:-1] == answer[:-1]:
        return "units digit wrong only"
    return "units right, rest wrong" if r[-1] == answer[-1] else "both digits wrong"


def error_structure(policy_dir: str, n_prompts: int, k: int, seed: int = 0) -> dict:
    problems = addition_problems()[0][:n_prompts]
    samples = sample_responses(*load_policy(policy_dir), [p.prompt for p in problems], k, 6, 1.0, seed=seed)
    kinds, correct_per_group = collections.Counter(), []
    for p, responses in zip(problems, samples, strict=True):
        labels = [classify(r, p.answer) for r in responses]
        kinds.update(labels)
        correct_per_group.append(labels.count("correct"))
    n = sum(kinds.values())
    share = {kind: round(kinds[kind] / n, 3) for kind in KINDS}
    return {"policy": policy_dir, "samples": n, "share": share,
            "units_digit_right": round(share["correct"] + share["units right, rest wrong"], 3),
            "groups_with_a_correct_sample": round(sum(c > 0 for c in correct_per_group) / len(correct_per_group), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("policies", nargs="+", help="SFT checkpoint directories")
    ap.add_argument("--prompts", type=int, default=400, help="training prompts sampled")
    ap.add_argument("--samples", type=int, default=8, help="samples per prompt (the GRPO group size)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for path in args.policies:
        print(json.dumps(error_structure(path, args.prompts, args.samples)))


if __name__ == "__main__":
    main()
