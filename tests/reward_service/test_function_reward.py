"""kind=function sources on a real local Ray + Serve: user files written into a temporary directory,
per-sample and batched, a module:name function, and everything a user function can do wrong (raise,
NaN, a non-number, hang, a wrong-length batch, fail to import). One Ray session for the module; one
app of well-behaved sources and one of misbehaving ones."""

from __future__ import annotations

import hashlib
import re
import textwrap
import threading
import time
from pathlib import Path

import pytest
import ray

from reward_service.client import RewardClient, RewardDeployError
from reward_service.config import RewardConfig, RewardSourceConfig
from reward_service.records import RewardRequest
from reward_service.scorers import load_function

GOOD_FILE = '''
    from dataclasses import dataclass

    @dataclass
    class _Weights:  # a dataclass needs its module in sys.modules
        right: float = 1.0

    def score(prompt: str, response: str, **metadata) -> float:
        return _Weights().right if response.strip() == metadata["answer"] else 0.0

    def score_batch(prompts, responses, metadatas):
        return [float(len(p) + len(r)) for p, r in zip(prompts, responses)]
'''

FLAKY_FILE = '''
    import math
    import time

    def per_sample(prompt, response, **metadata):
        mode = metadata.get("mode")
        if mode == "raise":
            raise RuntimeError(f"cannot score {response!r}")
        if mode == "nan":
            return math.nan
        if mode == "text":
            return "high"
        if mode == "hang":
            time.sleep(20)
        return 1.0

    def batched(prompts, responses, metadatas):
        modes = {m.get("mode") for m in metadatas}
        if "batch_raise" in modes:
            raise ValueError("bad batch")
        if "short" in modes:
            return [1.0]
        if "hang" in modes:
            time.sleep(20)
        return [0.5] * len(prompts)
'''


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_rewards")
    return {"good": _write(root / "good_rewards.py", GOOD_FILE),
            "flaky": _write(root / "flaky_rewards.py", FLAKY_FILE),
            "broken": _write(root / "broken_rewards.py", "import relay_no_such_module\n")}


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def _fn(name: str, function: str, **kwargs) -> RewardSourceConfig:
    return RewardSourceConfig(name=name, kind="function", function=function, num_cpus=0.1, **kwargs)


@pytest.fixture(scope="module")
def good(cluster, files):
    cfg = RewardConfig(sources=[
        _fn("exact", f"{files['good']}:score"),
        _fn("lengths", f"{files['good']}:score_batch", batched=True, weight=0.0),
        _fn("module", "tests.reward_service.user_rewards:length_score", weight=0.0),
        RewardSourceConfig(name="tags", kind="rule", rule="format", params={"tags": ["think", "answer"]},
                           weight=0.0),
        RewardSourceConfig(name="overlong", kind="rule", rule="overlong", weight=0.0,
                           params={"max_tokens": 10, "overlong_buffer": 4}),
    ], http_enabled=False)
    c = RewardClient.deploy(cfg, app_name="fn-good")
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def flaky(cluster, files):
    cfg = RewardConfig(sources=[
        _fn("per_sample", f"{files['flaky']}:per_sample", timeout_s=1.0, concurrency=2),
        _fn("batched", f"{files['flaky']}:batched", batched=True, timeout_s=1.0),
    ], http_enabled=False, max_retries=0)
    c = RewardClient.deploy(cfg, app_name="fn-flaky")
    yield c
    c.shutdown()


def test_file_per_sample_batched_module_and_rule_params(good):
    think = "<think>2+1</think> <answer>3</answer>"
    right, wrong, tagged = good.score([RewardRequest("1+2=", "3", {"answer": "3"}, response_tokens=6),
                                       RewardRequest("1+2=", "4", {"answer": "3"}, response_tokens=8),
                                       RewardRequest("1+2=", think, {"answer": "3"}, response_tokens=12)])
    assert right.error is None and wrong.error is None and tagged.error is None
    assert (right.reward, wrong.reward, tagged.reward) == (1.0, 0.0, 0.0)
    assert right.components == {"exact": 1.0, "lengths": 5.0, "module": 1.0, "tags": 0.0, "overlong": 0.0}
    assert wrong.components["overlong"] == -0.5  # 2 tokens into the 4-token buffer before max_tokens=10
    assert tagged.components["tags"] == 1.0 and tagged.components["module"] == len(think)
    assert tagged.components["lengths"] == 4 + len(think) and tagged.components["overlong"] == -1.0


def test_file_text_is_shipped_at_deploy_time(good, files):
    """Replicas run the text read at deploy: the scorer reports its hash, and a replica never reads the
    path again (on another node the path need not exist)."""
    shipped = {st["file_sha256"] for st in good.source_stats()["exact"]}
    assert shipped == {hashlib.sha256(files["good"].read_bytes()).hexdigest()}


def test_dict_requests_carry_response_tokens(good):
    ok, bad, missing = good.score([
        {"prompt": "1+2=", "response": "3", "metadata": {"answer": "3"}, "response_tokens": 11},
        {"prompt": "1+2=", "response": "3", "metadata": {"answer": "3"}, "response_tokens": -1},
        {"prompt": "1+2=", "response": "3", "metadata": {"answer": "3"}}])
    assert ok.error is None and ok.components["overlong"] == -1.0
    assert "response_tokens must be an int >= 0" in bad.error
    assert "rule 'overlong' needs response_tokens" in missing.error


def test_raise_nan_and_non_numbers_are_per_sample_errors(flaky):
    fine, raised, nan, text = flaky.score([RewardRequest("p", "r0", {}), RewardRequest("p", "r1", {"mode": "raise"}),
                                           RewardRequest("p", "r2", {"mode": "nan"}),
                                           RewardRequest("p", "r3", {"mode": "text"})])
    assert fine.error is None and fine.reward == 1.5
    assert raised.reward is None and "raised RuntimeError: cannot score 'r1'" in raised.error
    assert "response='r1'" in raised.error  # the sample is named
    assert "returned nan, not a finite number" in nan.error and "response='r2'" in nan.error
    assert "returned str 'high', not a number" in text.error
    assert all(r.components.get("batched") == 0.5 for r in (raised, nan, text))  # the other source still scored


def test_batched_exceptions_and_wrong_lengths_fail_the_whole_call(flaky):
    raised = flaky.score([RewardRequest("p", "a", {}), RewardRequest("p", "b", {"mode": "batch_raise"})])
    assert all("raised ValueError: bad batch" in r.error for r in raised)
    short = flaky.score([RewardRequest("p", "a", {}), RewardRequest("p", "b", {"mode": "short"})])
    assert all("returned 1 values for 2 samples" in r.error for r in short)


def test_hung_calls_time_out_and_the_replica_keeps_serving(flaky):
    before = flaky.stats()["function_timeouts"]
    start = time.monotonic()
    results = flaky.score([RewardRequest("p", f"h{i}", {"mode": "hang"}) for i in range(3)]
                          + [RewardRequest("p", "ok", {})])
    took = time.monotonic() - start
    # per sample: 3 hung calls on 2 slots end by 2 * timeout_s; batched: the one call times out at 1 s
    assert took < 6, f"a call with hung samples took {took:.1f}s"
    assert all("timed out" in r.error for r in results)
    assert "timeout_s=1s" in results[0].error and "response='h0'" in results[0].error
    assert flaky.stats()["function_timeouts"] - before == 3 + 1
    again = flaky.score([RewardRequest("p", "ok", {})])[0]  # the hung threads still sleep; slots are free
    assert again.error is None and again.reward == 1.5
    (per_sample,) = flaky.source_stats()["per_sample"]
    assert per_sample["abandoned_threads"] >= 3


def test_a_slow_call_does_not_hold_up_other_calls(flaky):
    done: dict[str, float] = {}

    def hang():
        flaky.score([RewardRequest("p", "slow", {"mode": "hang"})])
        done["hang"] = time.monotonic()

    thread = threading.Thread(target=hang)
    thread.start()
    time.sleep(0.3)
    assert flaky.score([RewardRequest("p", "fast", {})])[0].error is None
    done["fast"] = time.monotonic()
    thread.join(timeout=30)
    assert done["fast"] < done["hang"]


def test_a_function_that_cannot_be_imported_fails_the_deploy(cluster, files):
    cfg = RewardConfig(sources=[_fn("broken", f"{files['broken']}:score")], http_enabled=False)
    start = time.monotonic()
    with pytest.raises(RewardDeployError) as info:
        RewardClient.deploy(cfg, app_name="fn-broken")
    took = time.monotonic() - start
    message = str(info.value)
    assert message.startswith("reward service 'fn-broken' failed: source-broken: ")
    assert f"cannot import {files['broken']}: ModuleNotFoundError: No module named 'relay_no_such_module'" \
        in message.splitlines()[0]
    assert took < 60, f"a failed deploy took {took:.0f}s"
    _wait_for_deletion("fn-broken")


def test_deploy_gives_up_after_deploy_timeout_s(cluster):
    """A replica that never starts (here: more CPUs than the cluster has) fails the deploy in bounded time, named.
    On a slow machine the ingress may still be starting too at the deadline, and is then named as well."""
    cfg = RewardConfig(sources=[RewardSourceConfig(name="huge", kind="rule", rule="exact_match", inline=False,
                                                   num_cpus=64)],
                       http_enabled=False, deploy_timeout_s=3)
    start = time.monotonic()
    with pytest.raises(RewardDeployError) as info:
        RewardClient.deploy(cfg, app_name="fn-huge")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert message.startswith("reward service 'fn-huge' did not start within deploy_timeout_s=3s: "), message
    assert re.search(r"source-huge: no replica is running yet; replicas: \{'\w+': 1\}", message), message
    _wait_for_deletion("fn-huge")


def _wait_for_deletion(app_name: str, timeout_s: float = 60) -> None:
    """A failed deploy deletes its app in the background."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while app_name in serve.status().applications:
        assert time.monotonic() < deadline, f"app {app_name!r} still there after {timeout_s}s"
        time.sleep(0.5)


def test_load_function_names_what_is_missing(tmp_path):
    path = _write(tmp_path / "few.py", "def other(prompt, response): return 1.0\n")
    with pytest.raises(ImportError, match=re.escape(f"{path} has no function 'score' (found nothing)")):
        load_function(f"{path}:score")
    with pytest.raises(ImportError, match="cannot import relay_no_such_pkg.mod: ModuleNotFoundError"):
        load_function("relay_no_such_pkg.mod:score")
    assert load_function(f"{path}:other", file_text="def other(p, r): return 2.0\n")("p", "r") == 2.0
