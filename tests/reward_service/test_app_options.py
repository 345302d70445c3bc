"""Deployment options derived from the config (no Ray needed)."""

from typing import get_args

import pytest

from reward_service.app import SCORERS, _source_options, build_app
from reward_service.config import RewardConfig, RewardSourceConfig


def test_fixed_replicas_and_resources():
    src = RewardSourceConfig(name="rm", kind="model", model_path="/ckpt", num_replicas=3, num_cpus=2, num_gpus=0.5,
                             max_batch_size=16, max_ongoing_requests=64)
    opts = _source_options(src, RewardConfig())
    assert opts["name"] == "source-rm" and opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert opts["max_ongoing_requests"] == 64


def test_autoscaling_replaces_num_replicas():
    src = RewardSourceConfig(name="rm", kind="model", model_path="/ckpt",
                             autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
    opts = _source_options(src, RewardConfig())
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}


def test_build_app_binds_one_deployment_per_source_but_inline_rules():
    cfg = RewardConfig(sources=[RewardSourceConfig(name="em", kind="rule", rule="exact_match"),
                                RewardSourceConfig(name="fmt", kind="rule", rule="format", inline=False,
                                                   num_replicas=2),
                                RewardSourceConfig(name="rm", kind="model", model_path="/ckpt")])
    app = build_app(cfg)
    deployment = app._bound_deployment
    assert deployment.name == "RewardIngress"
    bound_sources = deployment.init_args[1]
    assert sorted(bound_sources) == ["fmt", "rm"]  # em is scored in the ingress
    assert bound_sources["fmt"]._bound_deployment.num_replicas == 2


def test_every_kind_has_a_scorer():
    assert set(SCORERS) == set(get_args(RewardSourceConfig.model_fields["kind"].annotation))


def test_function_file_text_is_bound_at_build_time(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def score(prompt, response, **metadata):\n    return 1.0\n")
    cfg = RewardConfig(sources=[RewardSourceConfig(name="f", kind="function", function=f"{path}:score"),
                                RewardSourceConfig(name="m", kind="function", function="my_pkg.rewards:score")])
    sources = build_app(cfg)._bound_deployment.init_args[1]
    assert sources["f"]._bound_deployment.init_args == (cfg.sources[0], path.read_text())
    assert sources["m"]._bound_deployment.init_args == (cfg.sources[1],)  # imported by name on the replica
    assert "runtime_env" not in sources["f"]._bound_deployment.ray_actor_options
    path.unlink()
    with pytest.raises(FileNotFoundError, match=rf"reward.sources\['f'\].function: cannot read {path}"):
        build_app(cfg)


def test_code_source_options():
    src = RewardSourceConfig(name="c", kind="code", num_cpus=4, concurrency=4, max_batch_size=8)
    opts = _source_options(src, RewardConfig())
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0.0} and opts["num_replicas"] == 1


def test_access_log_is_off_unless_asked():
    """reward.access_log: the ingress and every source's replicas log a line per call only when it is true."""
    for flag in (False, True):
        cfg = RewardConfig(sources=[RewardSourceConfig(name="em", kind="rule", rule="exact_match", inline=False)],
                           access_log=flag)
        ingress = build_app(cfg)._bound_deployment
        source = ingress.init_args[1]["em"]._bound_deployment
        for deployment in (ingress, source):
            assert deployment.logging_config["enable_access_log"] is flag
