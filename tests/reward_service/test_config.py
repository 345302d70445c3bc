from pathlib import Path

import pytest
from pydantic import ValidationError

from reward_service.config import (
    AutoscalingSpec,
    RewardConfig,
    RewardModelTrainConfig,
    RewardSourceConfig,
    default_backbone_path,
)


def test_defaults():
    cfg = RewardConfig()
    assert [(s.name, s.kind, s.rule, s.weight) for s in cfg.sources] == [("exact_match", "rule", "exact_match", 1.0)]
    assert (cfg.timeout_s, cfg.http_host, cfg.http_port, cfg.clip, cfg.normalize) == (30.0, "127.0.0.1", 8000,
                                                                                      None, False)


def test_every_field_is_documented():
    for model in (RewardConfig, RewardSourceConfig, AutoscalingSpec, RewardModelTrainConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_backbone_default_is_the_packaged_minilm():
    path = Path(default_backbone_path())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert RewardModelTrainConfig().backbone == str(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "rule"}, "kind=rule needs 'rule'"),
    ({"kind": "rule", "rule": "nope"}, "unknown rule 'nope'; valid rules"),
    ({"kind": "model"}, "kind=model needs 'model_path'"),
    ({"kind": "ensemble", "model_paths": ["a"]}, "at least two checkpoints"),
    ({"kind": "rule", "rule": "format", "uncertainty_penalty": 1.0}, "only applies to kind=ensemble"),
    ({"kind": "rule", "rule": "format", "num_replicas": 2, "autoscaling": {}}, "either num_replicas or autoscaling"),
    ({"kind": "rule", "rule": "format", "pooling": "max"}, "pooling"),
    ({"kind": "rule", "rule": "format", "max_batch_size": 0}, "max_batch_size"),
    ({"kind": "rule", "rule": "format", "wieght": 2.0}, "wieght"),
    ({"kind": "rule", "rule": "format", "max_batch_size": 64, "max_ongoing_requests": 8}, "batches can never fill"),
])
def test_source_validation_names_the_problem(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        RewardSourceConfig(name="s", **kwargs)


def test_reward_config_validation():
    rule = {"name": "a", "kind": "rule", "rule": "format"}
    with pytest.raises(ValidationError, match=r"duplicate source names \['a'\]"):
        RewardConfig(sources=[rule, rule])
    with pytest.raises(ValidationError, match="lo < hi"):
        RewardConfig(clip=(1.0, -1.0))
    with pytest.raises(ValidationError, match="at least one source"):
        RewardConfig(sources=[])
    with pytest.raises(ValidationError, match="min_replicas"):
        AutoscalingSpec(min_replicas=3, max_replicas=2)


def test_config_from_yaml_like_dict():
    cfg = RewardConfig.model_validate({
        "sources": [{"name": "em", "kind": "rule", "rule": "exact_match"},
                    {"name": "rm", "kind": "model", "model_path": "/ckpt", "weight": 0.5,
                     "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16}}],
        "clip": [-1, 1], "normalize": True})
    assert cfg.sources[1].autoscaling.max_replicas == 4 and cfg.clip == (-1.0, 1.0)
