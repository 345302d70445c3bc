"""The fail-fast resource arithmetic, the oversubscription warning, and what init_ray asks of Ray (no Ray
needed: ray.init is replaced)."""

import types

import pytest
import ray

from cluster.config import load_config
from cluster.resources import init_ray, oversubscription_warning, requested


def test_requested_sums_learner_actors_and_replicas():
    cfg = load_config(None, ["generation.num_actors=3", "generation.num_cpus=2", "learner.num_cpus=1"])
    # learner 1 + 3 actors x 2 + ingress 0.1 + one exact_match rule replica x 0.5
    assert requested(cfg) == {"CPU": 1 + 6 + 0.1 + 0.5, "GPU": 0.0}


def test_staleness_with_more_threads_than_cores_warns(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert oversubscription_warning(load_config(), cores=2) is None  # on-policy: they alternate
    stale = load_config(None, ["algorithm.max_staleness=1"])
    message = oversubscription_warning(stale, cores=2)
    assert message and "4 torch threads on 2 cores" in message and "generation.torch_threads" in message
    fits = load_config(None, ["algorithm.max_staleness=1", "generation.torch_threads=1", "learner.torch_threads=1"])
    assert oversubscription_warning(fits, cores=2) is None
    assert oversubscription_warning(stale, cores=8) is None


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


def test_component_output_stays_in_files_unless_asked(fake_ray_init):
    lines = []
    assert init_ray(load_config().cluster, log=lines.append)
    assert fake_ray_init[-1]["log_to_driver"] is False
    assert lines[-1].startswith("component logs (actors, reward replicas, Serve): /tmp/ray/session_x/logs;")
    assert "metrics.log_to_driver=true" in lines[-1]

    init_ray(load_config(None, ["cluster.address=10.0.0.1:6379"]).cluster, log=lines.append, log_to_driver=True)
    assert fake_ray_init[-1] == {"address": "10.0.0.1:6379", "log_to_driver": True}
    assert lines[-2] == "joined Ray cluster at 10.0.0.1:6379"
    assert "/tmp/ray/session_x/logs on each node" in lines[-1] and "also printed here" in lines[-1]
    assert load_config().metrics.log_to_driver is False
