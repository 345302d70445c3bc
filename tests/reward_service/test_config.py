from pathlib import Path

import pytest
from pydantic import ValidationError

from reward_service.config import (
    AutoscalingSpec,
    FunctionRef,
    RewardConfig,
    RewardModelTrainConfig,
    RewardSourceConfig,
    SandboxSpec,
    default_backbone_path,
)


def test_defaults():
    cfg = RewardConfig()
    assert [(s.name, s.kind, s.rule, s.weight) for s in cfg.sources] == [("exact_match", "rule", "exact_match", 1.0)]
    assert (cfg.timeout_s, cfg.http_host, cfg.http_port, cfg.clip, cfg.normalize) == (30.0, "127.0.0.1", 8000,
                                                                                      None, False)


def test_every_field_is_documented():
    for model in (RewardConfig, RewardSourceConfig, AutoscalingSpec, SandboxSpec, RewardModelTrainConfig):
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
    ({"kind": "rule", "rule": "format", "params": {"tagz": ["a"]}},
     r"reward.sources\['s'\].params: rule 'format' has no param 'tagz'; allowed params: \['pattern', 'tags'\]"),
    ({"kind": "rule", "rule": "exact_match", "params": {"tags": ["a"]}}, "rule 'exact_match' has no param 'tags'"),
    ({"kind": "rule", "rule": "overlong"}, r"reward.sources\['s'\].params: rule 'overlong' needs param 'max_tokens'"),
    ({"kind": "rule", "rule": "format", "params": {"pattern": "("}}, "param 'pattern' is not a valid regex"),
    ({"kind": "model", "model_path": "/ckpt", "params": {"x": 1}}, r"\.params only applies to kind=rule"),
    ({"kind": "rule", "rule": "format", "function": "f.py:g"}, r"\.function only applies to kind=function"),
    ({"kind": "rule", "rule": "format", "batched": True}, r"\.batched only applies to kind=function"),
    ({"kind": "rule", "rule": "format", "max_length": 8}, r"\.max_length only applies to kind=model\|ensemble"),
    ({"kind": "model", "model_path": "/ckpt", "sandbox": {"wall_seconds": 1}}, r"\.sandbox only applies to kind=code"),
    ({"kind": "code", "timeout_s": 3}, r"\.timeout_s only applies to kind=function \(this source is kind=code\)"),
    ({"kind": "code", "sandbox": {"wall_secs": 3}}, "wall_secs"),
    ({"kind": "code", "sandbox": {"file_size_mb": 0}}, "file_size_mb"),
    ({"kind": "function"}, "kind=function needs 'function'"),
    ({"kind": "function", "function": "rewards.py"}, "'rewards.py' lacks ':name', the function to call"),
    ({"kind": "function", "function": "rewards.py:"}, "lacks ':name'"),
    ({"kind": "function", "function": "rewards.py:not-a-name"}, "'not-a-name' in 'rewards.py:not-a-name' is not a "
                                                                 "Python identifier"),
    ({"kind": "function", "function": "relay_missing_dir/rewards.py:score"}, "relay_missing_dir/rewards.py' does "
                                                                              "not exist"),
    ({"kind": "function", "function": "my-pkg.rewards:score"}, "neither a .py file nor a dotted module name"),
    ({"kind": "function", "function": "pkg.rewards:score", "model_path": "/ckpt"}, "model_path only applies"),
    ({"kind": "rule", "rule": "format", "num_replicas": 2, "autoscaling": {}}, "either num_replicas or autoscaling"),
    ({"kind": "rule", "rule": "format", "num_replicas": 2}, r"no deployment of its own for num_replicas to size; "
                                                            r"set inline: false"),
    ({"kind": "rule", "rule": "format", "num_cpus": 1, "autoscaling": {}}, "for autoscaling, num_cpus to size"),
    ({"kind": "model", "model_path": "/ckpt", "inline": False}, "inline only applies to kind=rule"),
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


def test_function_file_is_resolved_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "mine.py").write_text("def score(prompt, response, **metadata):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    src = RewardSourceConfig(name="f", kind="function", function="rewards/mine.py:score", batched=True)
    assert src.function == f"{tmp_path.resolve()}/rewards/mine.py:score"
    monkeypatch.chdir("/")
    # a dumped config (every field written out, the path absolute) loads again from anywhere
    assert RewardSourceConfig.model_validate(src.model_dump()) == src
    rule = RewardSourceConfig(name="r", kind="rule", rule="format", params={"tags": ["a"]})
    assert RewardSourceConfig.model_validate(rule.model_dump()) == rule
    with pytest.raises(ValidationError, match=r"reward.sources\['f'\].function: file '/nope.py' does not exist "
                                              r"\(from 'nope.py', relative to '/'\)"):
        RewardSourceConfig(name="f", kind="function", function="nope.py:score")


def test_module_functions_are_kept_as_given():
    src = RewardSourceConfig(name="f", kind="function", function="my_pkg.rewards:score", timeout_s=1.5,
                             concurrency=8)
    assert src.function == "my_pkg.rewards:score" and (src.timeout_s, src.concurrency) == (1.5, 8)
    assert FunctionRef.parse(src.function) == FunctionRef("my_pkg.rewards", "score", False)


def test_code_source_defaults():
    src = RewardSourceConfig(name="c", kind="code", sandbox={"wall_seconds": 2})
    assert (src.tests_field, src.concurrency) == ("tests", 4)
    assert src.sandbox == SandboxSpec(cpu_seconds=2, wall_seconds=2.0, memory_mb=512, file_size_mb=1,
                                      max_processes=32, user="nobody")


def test_rule_params_are_kept_as_given():
    src = RewardSourceConfig(name="o", kind="rule", rule="overlong", params={"max_tokens": 512})
    assert src.params == {"max_tokens": 512}  # defaults are merged by the scorer, not written into the config
