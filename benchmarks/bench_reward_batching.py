"""Throughput of the reward-model deployment with Serve batching on and off.

Scores the same N texts with C concurrent callers, each sending one text per call, against the same
RM deployment configured with max_batch_size=1 (off) and max_batch_size=B (on); prints sequences/s
for each and the ratio. Callers are asyncio tasks awaiting DeploymentHandle responses (64 driver
threads blocking on .result() cost more driver CPU than the model does on a 2-core machine).

    python benchmarks/bench_reward_batching.py [--model-path CKPT] [--n 512] [--concurrency 64]
                                               [--batch-size 32] [--path rm|ingress] [--wait-s 0.05]

--path rm (default) calls the RM deployment's handle; --path ingress goes through the RewardIngress
(validation, fan-out, combination) as RewardClient does. Without --model-path a fresh MiniLM reward
model (untrained head) is used: speed does not depend on the head's weights.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from core.data import AdditionConfig, make_addition  # noqa: E402
from reward_service.app import source_deployment_name  # noqa: E402
from reward_service.client import RewardClient  # noqa: E402
from reward_service.config import RewardConfig, RewardSourceConfig, default_backbone_path  # noqa: E402
from reward_service.records import RewardRequest  # noqa: E402


def _requests(n: int) -> list[RewardRequest]:
    rows, _ = make_addition(AdditionConfig(n_train=n, n_eval=1, seed=7))
    return [RewardRequest(r["prompt"], r["answer"], {"answer": r["answer"]}) for r in rows]


async def _drive(handle, reqs: list[RewardRequest], concurrency: int) -> list:
    """``concurrency`` callers, each awaiting one single-text call at a time until ``reqs`` are done."""
    queue = list(enumerate(reqs))
    out: list = [None] * len(reqs)

    async def caller():
        while queue:
            i, req = queue.pop()
            out[i] = (await handle.score.remote([req]))[0]

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return out


def run(model_path: str, reqs: list[RewardRequest], concurrency: int, max_batch_size: int,
        path: str, wait_s: float) -> tuple[float, dict]:
    """Sequences/s of one configuration (after a warm-up round) and the RM replica's stats."""
    cfg = RewardConfig(sources=[RewardSourceConfig(name="rm", kind="model", model_path=model_path, num_cpus=1,
                                                   max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)],
                       http_enabled=False, timeout_s=120)
    app_name = f"bench-bs{max_batch_size}"
    client = RewardClient.deploy(cfg, app_name=app_name)
    handle = serve.get_deployment_handle(source_deployment_name("rm"), app_name) if path == "rm" else \
        serve.get_app_handle(app_name)
    try:
        asyncio.run(_drive(handle, reqs[:concurrency], concurrency))  # warm-up
        start = time.perf_counter()
        results = asyncio.run(_drive(handle, reqs, concurrency))
        elapsed = time.perf_counter() - start
        errors = [r.error for r in results if r.error is not None]
        assert not errors, errors[:3]
        return len(reqs) / elapsed, client.source_stats()["rm"][0]
    finally:
        client.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--path", choices=["rm", "ingress"], default="rm")
    parser.add_argument("--wait-s", type=float, default=0.05, help="serve.batch batch_wait_timeout_s")
    args = parser.parse_args()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            from reward_service.models import RewardModel

            model_path = os.path.join(tmp, "rm")
            RewardModel.from_backbone(default_backbone_path(), max_length=32).save_pretrained(model_path)
        reqs = _requests(args.n)
        off, off_stats = run(model_path, reqs, args.concurrency, 1, args.path, args.wait_s)
        on, on_stats = run(model_path, reqs, args.concurrency, args.batch_size, args.path, args.wait_s)
    print(f"texts={args.n} callers={args.concurrency} path={args.path}")
    print(f"batching off (max_batch_size=1):  {off:8.1f} seq/s  batches={off_stats['batches']}")
    print(f"batching on  (max_batch_size={args.batch_size}): {on:8.1f} seq/s  batches={on_stats['batches']} "
          f"mean batch={on_stats['items'] / max(1, on_stats['batches']):.1f}")
    print(f"speed-up: {on / off:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
