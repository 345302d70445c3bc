"""The fail-fast resource arithmetic and the oversubscription warning (no Ray needed)."""

from cluster.config import load_config
from cluster.resources import oversubscription_warning, requested


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
