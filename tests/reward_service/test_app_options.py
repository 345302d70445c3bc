"""Deployment options derived from the config (no Ray needed)."""

from reward_service.app import _source_options, build_app
from reward_service.config import RewardConfig, RewardSourceConfig


def test_fixed_replicas_and_resources():
    src = RewardSourceConfig(name="rm", kind="model", model_path="/ckpt", num_replicas=3, num_cpus=2, num_gpus=0.5,
                             max_batch_size=16, max_ongoing_requests=64)
    opts = _source_options(src)
    assert opts["name"] == "source-rm" and opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 64


def test_autoscaling_replaces_num_replicas():
    src = RewardSourceConfig(name="rm", kind="model", model_path="/ckpt",
                             autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
    opts = _source_options(src)
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}


def test_build_app_binds_one_deployment_per_source():
    cfg = RewardConfig(sources=[RewardSourceConfig(name="em", kind="rule", rule="exact_match"),
                                RewardSourceConfig(name="fmt", kind="rule", rule="format", num_replicas=2)])
    app = build_app(cfg)
    deployment = app._bound_deployment
    assert deployment.name == "RewardIngress"
    bound_sources = deployment.init_args[1]
    assert sorted(bound_sources) == ["em", "fmt"]
    assert bound_sources["fmt"]._bound_deployment.num_replicas == 2
