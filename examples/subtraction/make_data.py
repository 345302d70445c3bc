"""Write the subtraction example's data: train.jsonl and eval.jsonl, disjoint by prompt.

Each record is {"question": "83-47", "answer": "36"}: two-digit operands, the first at least the second,
so answers run from 0 to 89 with borrows but no sign: all 4,095 such problems, 400 of them held out.
The YAML beside this file formats the prompt with the template "{question}=" and SFTs on "answer".

    python examples/subtraction/make_data.py [OUT_DIR]   # default: examples/subtraction/data
"""

import json
import random
import sys
from pathlib import Path


def main(out: Path, n_eval: int = 400, seed: int = 0) -> None:
    pairs = [(a, b) for a in range(10, 100) for b in range(10, a + 1)]
    random.Random(seed).shuffle(pairs)
    rows = [{"question": f"{a}-{b}", "answer": str(a - b)} for a, b in pairs]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", rows[:n_eval]), ("train", rows[n_eval:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"wrote {len(rows) - n_eval} training and {n_eval} held-out records to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data")
