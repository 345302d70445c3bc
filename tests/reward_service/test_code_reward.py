"""kind=code sources through the real Serve app: a correct, a half-correct, a CPU-bound infinite loop and a
sleeping solution, scored by the sandbox; why each run ended shows in the ingress stats as code_<reason>."""

from __future__ import annotations

import json

import pytest
import ray

from reward_service.client import RewardClient
from reward_service.config import RewardConfig, RewardSourceConfig
from reward_service.records import RewardRequest

sandbox = pytest.importorskip("reward_service.sandbox", reason="reward_service/sandbox.py is not there")

TESTS = json.dumps(["assert add(1, 2) == 3", "assert add(2, 2) == 4"])
CORRECT = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\n"
HALF = "```python\ndef add(a, b):\n    return a + b if a < 2 else 0\n```"
SPIN = "```python\nwhile True:\n    pass\n```"
SLEEP = "```python\nimport time\ntime.sleep(60)\n```"


@pytest.fixture(scope="module")
def client():
    try:
        sandbox.Sandbox(sandbox.SandboxLimits(wall_seconds=5.0))
    except sandbox.SandboxUnavailable as exc:
        pytest.skip(f"the code sandbox cannot run here: {exc}")
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    cfg = RewardConfig(sources=[RewardSourceConfig(name="code", kind="code", concurrency=4, num_cpus=0.1,
                                                   sandbox={"cpu_seconds": 1, "wall_seconds": 3.0})],
                       http_enabled=False)
    c = RewardClient.deploy(cfg, app_name="code-test")
    yield c
    c.shutdown()
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _req(response: str, tests: str | None = TESTS) -> RewardRequest:
    return RewardRequest("Write add(a, b).", response, {"tests": tests} if tests is not None else {})


def test_fraction_of_tests_passed_and_reasons_counted(client):
    correct, half, spin, sleep = client.score([_req(CORRECT), _req(HALF), _req(SPIN), _req(SLEEP)])
    assert (correct.reward, half.reward, spin.reward, sleep.reward) == (1.0, 0.5, 0.0, 0.0)
    assert all(r.error is None for r in (correct, half, spin, sleep))
    stats = client.stats()
    assert {reason: stats[f"code_{reason}"] for reason in ("ok", "failed", "cpu", "timeout")} == \
        {"ok": 1.0, "failed": 1.0, "cpu": 1.0, "timeout": 1.0}
    assert set(sandbox.REASONS) <= {key.removeprefix("code_") for key in stats if key.startswith("code_")}


def test_missing_or_bad_tests_are_per_sample_errors(client):
    missing, bad, empty, fine = client.score([_req(CORRECT, None), _req(CORRECT, "[not json"), _req(CORRECT, ""),
                                              _req(CORRECT, "assert add(0, 0) == 0")])
    assert "needs the tests in metadata['tests']" in missing.error
    assert "metadata['tests']: tests look like a JSON list but do not parse" in bad.error
    assert "holds no tests" in empty.error
    assert fine.reward == 1.0 and fine.error is None
