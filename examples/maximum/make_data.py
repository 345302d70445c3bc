"""Write the maximum example's data: train.jsonl and eval.jsonl, disjoint by prompt.

Each record is {"numbers": "47 82 19", "answer": "82"}: three two-digit numbers and the largest of them,
8,100 distinct problems drawn from the 729,000, 500 of them held out.

    python examples/maximum/make_data.py [OUT_DIR]   # default: examples/maximum/data
"""

import json
import random
import sys
from pathlib import Path


def main(out: Path, n_train: int = 7600, n_eval: int = 500, seed: int = 0) -> None:
    rng = random.Random(seed)
    triples: set[tuple[int, int, int]] = set()
    while len(triples) < n_train + n_eval:
        triples.add((rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)))
    ordered = sorted(triples)
    rng.shuffle(ordered)
    rows = [{"numbers": " ".join(map(str, t)), "answer": str(max(t))} for t in ordered]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", rows[:n_eval]), ("train", rows[n_eval:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"wrote {n_train} training and {n_eval} held-out records to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data")
