"""Cost of publishing weights through the object store, by size and number of readers, against memcpy.

For each size: the learner-side cost of a version (pack into per-dtype buffers + one ``ray.put``) with 1, 2
and 4 readers, each reader's ``ray.get`` + zero-copy unpack into tensors + one read of every element (as a
weight loader does), and a plain ``memcpy`` of the same bytes (``torch`` copy into a preallocated buffer)
for scale. The pack buffers are kept from one version to the next, as the learner keeps them
(``pack_weights(reuse=)``); the first publish of each size, into memory touched for the first time, is
reported on its own. The publish cost must not grow with the readers (target: flat); a reader's ``ray.get`` maps
shared memory instead of copying.

    python benchmarks/bench_weight_sync.py [--mb 4,64,256,1024] [--repeats 3]

``--engines``: the same sizes into a real generation actor (a Ray actor holding a vLLM engine, one thread,
pinned to a core of its own; its background fetch, which also packs the weights for the CPU GEMMs, on the other
core, as a pinned run lays them out) on a second Ray node (``ray.cluster_utils.Cluster``: its own raylet and
object store), so its fetch is a transfer between object stores as on a cluster; the driver, which packs and
puts as the learner does, is on the head node and the other core. A Qwen2 of each size (random weights, hidden size
and layers chosen for the bytes) loads a published version with the synchronous path (``update_weights``: the
actor's ``ray.get`` and the direct load, generation stopped for both) and with hidden sync
(``stage_weights`` fetches in the background while a request samples, the next request swaps it in). Per
size: fetch and load (swap) seconds; a request's time alone; and the generation time a sync costs, with
hidden sync off (a request, the publish and a synchronous load, then a request: the actor idles through the
publish too, less two requests alone) and on (the first request sampling while the version is published and
fetched, the second swapping it in, less two alone).

Writes ``benchmarks/results/weight_sync/results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from learner.weights import pack_weights, unpack_weights

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "weight_sync"
SHAPES = {4: (256, 1), 64: (512, 4), 256: (1024, 4), 1024: (1024, 16)}
"""MB -> (hidden size, layers) of a Qwen2 with an MLP 4x wide: 16 hidden^2 parameters a layer, float32"""


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


def build_model(mb: int, where: Path) -> str:
    """A randomly initialised float32 Qwen2 of about ``mb`` MB with the embedded tokenizer, saved in ``where``."""
    from learner.bootstrap import build_tiny_model, build_tokenizer
    from learner.config import TinyModelConfig

    hidden, layers = SHAPES[mb]
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, TinyModelConfig(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                                                        intermediate_size=4 * hidden))
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
    return str(where)


def engine_row(mb: int, repeats: int, prompts_per_call: int) -> dict:
    """One size through a real generation actor (see the module docstring); run in a fresh process."""
    from actors.generation import WEIGHTS_GROUP, GenerationActor
    from cluster.config import load_config
    from cluster.driver import encode_data
    from core.affinity import pin_process
    from core.data import load_splits

    # the driver (the learner's side: pack + put) and the actor's background fetch on core 0, the actor on core 1
    pin_process([0])
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(mb, Path(tmp))
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        named = list(model.named_parameters())
        cfg = load_config(overrides=["generation.torch_threads=1"])
        data = encode_data(cfg, load_splits(cfg.data, cfg.model.cache_dir, log=lambda *_: None),
                           AutoTokenizer.from_pretrained(path), log=lambda *_: None)
        prompts = data.train[:prompts_per_call]
        from ray.cluster_utils import Cluster

        store = 4 * 1024**3
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
        cluster.add_node(num_cpus=1, resources={"generation": 1}, object_store_memory=store)
        ray.init(address=cluster.address, log_to_driver=False)
        actor = ray.remote(num_cpus=1, resources={"generation": 1}, concurrency_groups={WEIGHTS_GROUP: 1})(
            GenerationActor).remote(cfg.generation, path, "float32", cores=[1], background_cores=[0])
        buffers: dict[str, torch.Tensor] = {}
        version = 0

        def publish():
            nonlocal version
            version += 1
            return version, ray.put(pack_weights(named, version, reuse=buffers))

        def generate():
            return actor.generate.remote(prompts)

        def seconds(ref) -> float:
            t0 = time.perf_counter()
            ray.get(ref, timeout=600)
            return time.perf_counter() - t0

        ray.get(generate(), timeout=600)  # warm-up
        alone = [seconds(generate()) for _ in range(repeats)]
        sync_fetch, sync_load, lost_off, lost_on, swaps, parts = [], [], [], [], [], []
        for _ in range(repeats):
            ray.get(generate(), timeout=600)
            t0 = time.perf_counter()  # hidden sync off: published, the actor gets and loads, then samples
            v, ref = publish()
            stats = ray.get(actor.update_weights.remote(v, [ref]), timeout=600)
            ray.get(generate(), timeout=600)
            lost_off.append(time.perf_counter() - t0 - statistics.median(alone))
            sync_fetch.append(stats["sync/fetch_seconds"])
            sync_load.append(stats["sync/load_seconds"])
            del ref
            t0 = time.perf_counter()  # hidden sync on: published and fetched while a request samples
            first = generate()
            v, ref = publish()
            staged = actor.stage_weights.options(concurrency_group=WEIGHTS_GROUP).remote(v, [ref])
            first_out, fetched = ray.get([first, staged], timeout=600)
            both = time.perf_counter() - t0
            second = ray.get(generate(), timeout=600)
            lost_on.append(time.perf_counter() - t0 - 2 * statistics.median(alone))
            swaps.append(second.swap_seconds)
            parts.append({"first_request_s": first_out.seconds, "background_fetch_s": fetched["sync/fetch_seconds"],
                          "first_and_fetch_wall_s": both, "second_request_s": second.seconds})
            del ref
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        ray.shutdown()
        cluster.shutdown()
    med = statistics.median
    return {"bytes": nbytes, "request_s": med(alone), "fetch_s": med(sync_fetch), "load_s": med(sync_load),
            "swap_s": med(swaps), "lost_sync_off_s": med(lost_off), "lost_sync_on_s": med(lost_on),
            "memcpy_s": memcpy_seconds(named, 3), "prompts_per_call": len(prompts),
            "hidden_parts": {k: med([q[k] for q in parts]) for k in parts[0]}}


def engine_table(rows: list[dict]) -> list[str]:
    lines = ["| model | request alone | synchronous: fetch | load | GB/s | hidden: swap | GB/s | memcpy | "
             "generation lost to a sync, hidden off | hidden on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["bytes"] / 1e9
        lines.append(f"| {r['bytes'] / 1e6:.0f} MB | {r['request_s']:.3f} s | {1000 * r['fetch_s']:.1f} ms | "
                     f"{r['load_s']:.3f} s | {gb / r['load_s']:.2f} | {r['swap_s']:.3f} s | {gb / r['swap_s']:.2f} | "
                     f"{r['memcpy_s']:.3f} s | {r['lost_sync_off_s']:.3f} s | {r['lost_sync_on_s']:.3f} s |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="4,64,256,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", action="store_true", help="also load each size into a generation actor")
    ap.add_argument("--prompts-per-call", type=int, help="prompts per generate request (x 8 samples); default 16 up "
                    "to 64 MB, fewer for larger models (4 at 256 MB, 2 at 1 GB), so a request takes about a second")
    ap.add_argument("--engine-only", type=int, help=argparse.SUPPRESS)  # internal: one size, JSON out
    args = ap.parse_args()
    if args.engine_only:
        print(json.dumps(engine_row(args.engine_only, args.repeats, args.prompts_per_call)))
        return
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
    engines = []
    for mb in (int(s) for s in args.mb.split(",")) if args.engines else ():
        import subprocess

        prompts = args.prompts_per_call or max(2, min(16, 1024 // mb))
        out = subprocess.run([sys.executable, __file__, "--engine-only", str(mb), "--repeats", str(args.repeats),
                              "--prompts-per-call", str(prompts)], cwd=ROOT, check=True,
                             capture_output=True, text=True)
        engines.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(engines[-1]), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    from bench_loop import machine

    (OUT / "results.json").write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                                                  "rows": rows, "engines": engines}, indent=2) + "\n")
    lines = ["| size | readers | publish (pack + put) | GB/s | memcpy | GB/s | reader get (max) | reader unpack + "
             "read | the size's first publish |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gb = r["bytes"] / 1e9
        lines.append(f"| {r['bytes'] / 1e6:.0f} MB | {r['readers']} | {r['publish_s']:.3f} s | "
                     f"{gb / r['publish_s']:.2f} | {r['memcpy_s']:.3f} s | {gb / r['memcpy_s']:.2f} | "
                     f"{1000 * r['get_s']:.1f} ms | {r['unpack_read_s']:.3f} s | {r['first_publish_s']:.3f} s |")
    if engines:
        lines += ["", *engine_table(engines)]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
