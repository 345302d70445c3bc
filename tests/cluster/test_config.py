"""The config schema: every bad key or value fails with a message naming it (no Ray needed)."""

from pathlib import Path

import pytest

from cluster.config import ConfigError, load_config, parse_override


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_default_loads_and_matches_local_yaml():
    assert load_config() == load_config("cluster/local.yaml")


def test_gpu_example_is_valid():
    cfg = load_config("cluster/gpu.yaml")
    assert cfg.generation.tensor_parallel_size == cfg.generation.num_gpus == 2 and cfg.model.dtype == "bfloat16"
    assert cfg.learner.num_workers == 4 and cfg.learner.strategy == "fsdp" and cfg.learner.num_gpus == 1


def test_learner_ranks_must_each_fit_on_one_node():
    from cluster.resources import learner_bundles_that_fit

    nodes = [{"CPU": 16.0, "GPU": 2.0}, {"CPU": 16.0, "GPU": 8.0}]
    assert learner_bundles_that_fit(nodes, cpus=4, gpus=1) == 2 + 4  # CPUs bound the second node: 16 / 4
    assert learner_bundles_that_fit(nodes, cpus=1, gpus=0) == 32
    assert learner_bundles_that_fit([{"CPU": 3.0}], cpus=2, gpus=0) == 1


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "generation:\n  num_actor: 2\n"))
    msg = str(e.value)
    assert "generation.num_actor" in msg and "did you mean 'generation.num_actors'" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'generatoin'.*did you mean 'generation'"):
        load_config(write(tmp_path, "generatoin: {}\n"))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"learner\.lr: .*got 'fast'"):
        load_config(write(tmp_path, "learner:\n  lr: fast\n"))


def test_zero_actors_is_impossible():
    with pytest.raises(ConfigError, match=r"generation\.num_actors: Input should be greater than or equal to 1"):
        load_config(overrides=["generation.num_actors=0"])


def test_unknown_algorithm_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"algorithm\.name.*'grpo'"):
        load_config(overrides=["algorithm.name=trpo"])


def test_malformed_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "generation: [unclosed\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_overrides_parse_yaml_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=null") == ("a.b", None)
    cfg = load_config(overrides=["generation.num_actors=2", "algorithm.kl_in=loss", "algorithm.kl_target=0.05"])
    assert cfg.generation.num_actors == 2 and cfg.algorithm.kl_target == 0.05
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("generation.num_actors")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="exceeds data.addition.n_eval"):
        load_config(overrides=["data.addition.n_eval=10", "train.eval_prompts=20"])
    with pytest.raises(ConfigError, match="replaced by learner.micro_batch_tokens"):
        load_config(overrides=["learner.micro_batch_size=64"])
    with pytest.raises(ConfigError, match="lora with learner.strategy fsdp"):
        load_config(overrides=["learner.lora.r=4", "learner.num_workers=2", "learner.strategy=fsdp"])
    with pytest.raises(ConfigError, match=r"min_tokens \(7\) is above generation.max_tokens \(6\)"):
        load_config(overrides=["generation.min_tokens=7"])
    with pytest.raises(ConfigError, match="min_tokens applies to whole responses"):
        load_config(overrides=["generation.min_tokens=2", "generation.partial_rollouts=true",
                               "algorithm.max_staleness=1"])
    with pytest.raises(ConfigError, match="Set max_staleness to 0, or deterministic to false"):
        load_config(overrides=["train.deterministic=true", "algorithm.max_staleness=1"])
    with pytest.raises(ConfigError, match=r"block_size \(16\) must be a multiple of 32 on CPU"):
        load_config(overrides=["generation.block_size=16"])


def test_partial_rollouts_take_the_smallest_cpu_block():
    g = load_config(overrides=["generation.partial_rollouts=true", "algorithm.max_staleness=1"]).generation
    assert g.engine_block_size == 32
    assert load_config().generation.engine_block_size is None  # vLLM's own default
    assert load_config(overrides=["generation.partial_rollouts=true", "algorithm.max_staleness=1",
                                  "generation.block_size=64"]).generation.engine_block_size == 64
    assert load_config(overrides=["generation.partial_rollouts=true", "algorithm.max_staleness=1",
                                  "generation.num_gpus=1"]).generation.engine_block_size is None


def test_readme_config_reference_matches_the_schema():
    from pathlib import Path

    from cluster.config import reference_table

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index("-->", text.index("<!-- config table")) + len("-->")
    table = text[start:text.index("<!-- end config table -->")].strip()
    assert table == reference_table(), "regenerate the README table from cluster.config.reference_table()"


def test_more_rm_pairs_than_training_prompts_fails_before_anything_runs():
    with pytest.raises(ConfigError, match=r"reward_model.n_pairs \(9000\) exceeds data.addition.n_train \(7600\)"):
        load_config(overrides=["reward_model.n_pairs=9000"])


def test_loading_a_config_imports_no_torch():
    """Layers point one way: the schema is pydantic only, so `relay --help` and config checks stay fast."""
    import subprocess
    import sys

    code = ("import sys, cluster.config, cluster.cli; "
            "cluster.config.load_config('cluster/examples/gsm8k_one_gpu.yaml'); "
            "bad = [m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2], timeout=60)


def test_components_import_only_the_base():
    """actors/, learner/ and reward_service/ import core/ and their own sections, never cluster/."""
    import re

    root = Path(__file__).resolve().parents[2]
    offenders = [f"{p.relative_to(root)}:{i}" for folder in ("actors", "learner", "reward_service", "core")
                 for p in (root / folder).glob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.match(r"\s*(from|import) cluster\b", line)]
    assert offenders == []


def test_gpu_example_loads_and_validates():
    cfg = load_config("cluster/examples/gsm8k_one_gpu.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.generation.num_gpus + cfg.learner.num_gpus == 1.0
    assert [s.rule for s in cfg.reward.sources] == ["math", "overlong"] and cfg.data.chat_template


def test_old_task_section_points_to_data():
    with pytest.raises(ConfigError, match="the task section became data"):
        load_config(overrides=["task.n_train=100"])
