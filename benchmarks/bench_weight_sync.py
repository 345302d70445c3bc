"""Cost of publishing weights through the object store, by model size and number of readers.

For each model size: the learner-side cost (pack into per-dtype buffers + one ``ray.put``) and
each reader's cost (``ray.get`` + zero-copy unpack into tensors) with 1 and with 4 readers. The
publish cost must not grow with the number of readers; a reader's cost should not grow with the
model much, since it maps shared memory instead of copying.

    python benchmarks/bench_weight_sync.py [--sizes 1,25,100] [--repeats 3]

Sizes are millions of fp32 parameters, as a few large tensors (a transformer's shapes do not
change the object-store path). The vLLM in-place reload on top of this is measured by the
training runs (``sync/load_seconds`` in metrics.jsonl).
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from learner.weights import pack_weights, unpack_weights


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


def fake_model(million: int) -> list[tuple[str, torch.Tensor]]:
    n = million * 1_000_000
    rows = 1024
    return [(f"layer{i}.weight", torch.randn(rows, n // (rows * 4))) for i in range(4)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,25,100")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=2 * 1024**3)
    readers = [Reader.remote() for _ in range(4)]
    print(f"{'params':>8} {'MB':>7} {'readers':>7} {'publish s':>10} {'get s (max)':>12} {'view+read s':>15}")
    for million in (int(s) for s in args.sizes.split(",")):
        named = fake_model(million)
        for n_readers in (1, 4):
            rows = []
            for version in range(args.repeats):
                t0 = time.perf_counter()
                packed = pack_weights(named, version)
                ref = ray.put(packed)
                publish = time.perf_counter() - t0
                loads = ray.get([r.load.remote([ref]) for r in readers[:n_readers]], timeout=300)
                rows.append((publish, max(g for g, _ in loads), max(u for _, u in loads), packed.nbytes))
                del ref, packed
            publish, get, read, nbytes = min(rows)
            print(f"{million:>7}M {nbytes / 1e6:>7.0f} {n_readers:>7} {publish:>10.3f} {get:>12.4f} {read:>15.4f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
