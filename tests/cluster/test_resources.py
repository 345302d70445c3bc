"""The fail-fast resource arithmetic, the oversubscription warning, and what init_ray asks of Ray (no Ray
needed: ray.init is replaced)."""

import json
import os
import subprocess
import sys
import types

import pytest
import ray

from cluster.config import load_config
from cluster.resources import core_layout, init_ray, local_cpus, oversubscription_warning, requested


def test_requested_sums_learner_actors_and_replicas():
    cfg = load_config(None, ["generation.num_actors=3", "generation.num_cpus=2", "learner.num_cpus=1"])
    # learner 1 + 3 actors x 2 + ingress 0.1 (the exact_match rule is scored in the ingress)
    assert requested(cfg) == {"CPU": 1 + 6 + 0.1, "GPU": 0.0}
    deployed = load_config(None, ["reward.sources=[{name: em, kind: rule, rule: exact_match, inline: false}]"])
    assert requested(deployed)["CPU"] == 1 + 2 + 0.1 + 0.5  # a rule with a deployment of its own: one replica


def test_staleness_with_more_threads_than_cores_warns(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert oversubscription_warning(load_config(), cores=2) is None  # on-policy: they alternate
    stale = load_config(None, ["algorithm.max_staleness=1"])
    message = oversubscription_warning(stale, cores=2)
    assert message and "4 torch threads on 2 cores" in message and "generation.num_actors=1" in message
    fits = load_config(None, ["algorithm.max_staleness=1", "generation.num_actors=1", "learner.torch_threads=1"])
    assert oversubscription_warning(fits, cores=2) is None
    assert oversubscription_warning(stale, cores=8) is None
    ranks = load_config(None, ["algorithm.max_staleness=1", "generation.num_actors=1", "learner.torch_threads=1",
                               "learner.num_workers=2"])  # every rank trains at once: 1 + 2 x 1 threads
    assert "3 torch threads on 2 cores" in oversubscription_warning(ranks, cores=2)
    assert oversubscription_warning(ranks, cores=3) is None


def test_core_layout_gives_generation_its_own_cores_only_where_they_overlap(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    streaming = ["algorithm.max_staleness=1", "generation.num_actors=1", "learner.torch_threads=1"]
    assert core_layout(load_config(None, streaming), [0, 1]) == {"rest": [0], "actors": [[1]]}
    two = load_config(None, [*streaming, "generation.num_actors=2", "generation.torch_threads=2"])
    assert core_layout(two, list(range(8))) == {"rest": [0, 1, 2, 3], "actors": [[4, 5], [6, 7]]}
    assert core_layout(load_config(), [0, 1]) is None  # on-policy: each side wants every core in turn
    assert core_layout(load_config(None, ["algorithm.max_staleness=1"]), [0, 1]) is None  # 2 + 2 do not fit
    assert core_layout(load_config(None, [*streaming, "cluster.pin_cores=false"]), [0, 1]) is None
    assert core_layout(load_config(None, [*streaming, "cluster.address=10.0.0.1:6379"]), [0, 1]) is None


PINNED = """
import json, os, threading, time
from core.affinity import pin_process
started = threading.Event()
worker = threading.Thread(target=lambda: (started.set(), time.sleep(2)), daemon=True)
worker.start(); started.wait()
pin_process([0])
later = []
threading.Thread(target=lambda: later.append(sorted(os.sched_getaffinity(0)))).start()
time.sleep(0.2)
tids = os.listdir("/proc/self/task")
print(json.dumps({"threads": [sorted(os.sched_getaffinity(int(t))) for t in tids], "later": later}))
"""


def test_pin_process_moves_every_thread_and_later_ones_inherit():
    out = json.loads(subprocess.run([sys.executable, "-c", PINNED], capture_output=True, text=True, check=True,
                                    timeout=60).stdout)
    assert len(out["threads"]) >= 2 and all(cores == [0] for cores in out["threads"])  # the running thread too
    assert out["later"] == [[0]]


@pytest.fixture
def fake_ray_init(monkeypatch):
    calls = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(address_info={"session_dir": "/tmp/ray/session_x"})

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_ray_holds_what_the_run_asks_for(fake_ray_init, monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    # learner 1 + two actors x 1 + ingress 0.1 = 3.1
    assert local_cpus(load_config()) == 4
    # a source of 2 CPUs a replica, autoscaled from 1 to 3: 1 + 2 + 0.1 + 2 at the fewest, + 3 x 2 = 9.1 at the most
    scaled = load_config(None, ["reward.sources=[{name: rm, kind: rule, rule: length_penalty, inline: false, "
                                "num_cpus: 2, "
                                "autoscaling: {min_replicas: 1, max_replicas: 3}}]"])
    assert requested(scaled)["CPU"] == 1 + 2 + 0.1 + 2 and local_cpus(scaled) == 10
    grows = load_config(None, ["generation.max_num_actors=4"])  # room for the fleet to grow to 4: 1 + 4 + 0.1
    assert requested(grows)["CPU"] == 3.1 and local_cpus(grows) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert local_cpus(load_config()) == 64  # a big machine: every core, as before
    init_ray(load_config(None, ["cluster.local_num_cpus=3"]), log=lambda _: None)
    assert fake_ray_init[-1]["num_cpus"] == 3  # named: taken as it is
    init_ray(load_config(), log=lambda _: None)
    assert fake_ray_init[-1]["num_cpus"] == 64


def test_component_output_stays_in_files_unless_asked(fake_ray_init):
    lines = []
    assert init_ray(load_config(), log=lines.append)
    assert fake_ray_init[-1]["log_to_driver"] is False
    assert lines[-1].startswith("component logs (actors, reward replicas, Serve): /tmp/ray/session_x/logs;")
    assert "metrics.log_to_driver=true" in lines[-1]

    init_ray(load_config(None, ["cluster.address=10.0.0.1:6379"]), log=lines.append, log_to_driver=True)
    assert fake_ray_init[-1] == {"address": "10.0.0.1:6379", "log_to_driver": True}
    assert lines[-2] == "joined Ray cluster at 10.0.0.1:6379"
    assert "/tmp/ray/session_x/logs on each node" in lines[-1] and "also printed here" in lines[-1]
    assert load_config().metrics.log_to_driver is False


def test_a_local_run_links_the_component_logs_into_its_run_directory(fake_ray_init, tmp_path):
    run = tmp_path / "run"
    lines = []
    for _ in range(2):  # a second session replaces the link the first left
        init_ray(load_config(), log=lines.append, link_logs=run)
        assert os.readlink(run / "logs") == "/tmp/ray/session_x/logs"
        assert f"(linked as {run / 'logs'})" in lines[-1]
    init_ray(load_config(None, ["cluster.address=10.0.0.1:6379"]), log=lines.append, link_logs=tmp_path / "joined")
    assert not (tmp_path / "joined").exists()  # a cluster's logs are on its nodes
    (run / "logs").unlink()
    (run / "logs").mkdir()  # the user's own directory of that name is left alone
    init_ray(load_config(), log=lines.append, link_logs=run)
    assert (run / "logs").is_dir() and not (run / "logs").is_symlink() and "linked" not in lines[-1]
