"""Cost of publishing weights through the object store, by size and number of readers, against memcpy.

For each size: the learner-side cost of a version (pack into per-dtype buffers + one ``ray.put``) with 1, 2
and 4 readers, each reader's ``ray.get`` + zero-copy unpack into tensors + one read of every element (as a
weight loader does), and a plain ``memcpy`` of the same bytes (``torch`` copy into a preallocated buffer)
for scale. The pack buffers are kept from one version to the next, as the learner keeps them
(``pack_weights(reuse=)``); the first publish of each size, into memory touched for the first time, is
reported on its own. The publish cost must not grow with the readers (target: flat); a reader's ``ray.get`` maps
shared memory instead of copying.

    python benchmarks/bench_weight_sync.py [--mb 4,64,256,1024] [--repeats 3]

The vLLM in-place reload (the swap, the only part of a sync that stops generation in the streaming loop)
is measured in the loop itself: ``sync/swap_seconds`` (``benchmarks/bench_loop.py``). Writes
``benchmarks/results/weight_sync/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import ray
import torch

from learner.weights import pack_weights, unpack_weights

OUT = Path(__file__).resolve().parent / "results" / "weight_sync"


@ray.remote(num_cpus=0.1)
class Reader:
    def load(self, packed_ref: list) -> tuple[float, float]:
        start = time.perf_counter()
        packed = ray.get(packed_ref[0], timeout=120)
        fetched = time.perf_counter()
        # Build the tensor views and read every element once (as a weight loader would).
        checksum = sum(float(t.sum()) for _, t in unpack_weights(packed))
        assert checksum == checksum  # not NaN
        return fetched - start, time.perf_counter() - fetched


def fake_model(mb: int) -> list[tuple[str, torch.Tensor]]:
    """Four fp32 tensors of ``mb`` MB in all (a transformer's shapes do not change the object-store path)."""
    n = mb * 1_000_000 // 4
    rows = 256
    return [(f"layer{i}.weight", torch.randn(rows, n // (rows * 4))) for i in range(4)]


def memcpy_seconds(named: list[tuple[str, torch.Tensor]], repeats: int) -> float:
    dst = [torch.empty_like(t) for _, t in named]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for d, (_, t) in zip(dst, named, strict=True):
            d.copy_(t)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="4,64,256,1024")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=4 * 1024**3)
    readers = [Reader.remote() for _ in range(4)]
    rows = []
    for mb in (int(s) for s in args.mb.split(",")):
        named = fake_model(mb)
        copy = memcpy_seconds(named, args.repeats)
        buffers: dict[str, torch.Tensor] = {}  # the learner's publish buffers, kept between versions
        first = None
        for n_readers in (1, 2, 4):
            best = None
            for version in range(args.repeats):
                t0 = time.perf_counter()
                packed = pack_weights(named, version, reuse=buffers)
                ref = ray.put(packed)
                publish = time.perf_counter() - t0
                first = publish if first is None else first
                loads = ray.get([r.load.remote([ref]) for r in readers[:n_readers]], timeout=300)
                row = (publish, max(g for g, _ in loads), max(u for _, u in loads), packed.nbytes)
                best = row if best is None or row < best else best
                del ref, packed
            publish, get, read, nbytes = best
            rows.append({"bytes": nbytes, "readers": n_readers, "publish_s": publish, "get_s": get,
                         "unpack_read_s": read, "memcpy_s": copy, "first_publish_s": first})
            print(json.dumps(rows[-1]), flush=True)
    ray.shutdown()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2) + "\n")
    lines = ["| size | readers | publish (pack + put) | GB/s | memcpy | GB/s | reader get (max) | reader unpack + "
             "read | the size's first publish |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["bytes"] / 1e9
        lines.append(f"| {r['bytes'] / 1e6:.0f} MB | {r['readers']} | {r['publish_s']:.3f} s | "
                     f"{gb / r['publish_s']:.2f} | {r['memcpy_s']:.3f} s | {gb / r['memcpy_s']:.2f} | "
                     f"{1000 * r['get_s']:.1f} ms | {r['unpack_read_s']:.3f} s | {r['first_publish_s']:.3f} s |")
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
