"""The one configuration schema, grouped by component, loaded from YAML with ``--set`` overrides.

Every field is documented where it is declared. Unknown keys, wrong types and impossible
values fail in ``load_config`` (before Ray starts) with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from actors.config import GenerationConfig
from core.data import DataConfig
from core.section import Section
from learner.config import AlgorithmConfig, DPOConfig, LearnerConfig, RWRConfig, SFTConfig, TinyModelConfig
from reward_service.config import RewardConfig, RewardModelTrainConfig, RewardSourceConfig


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the person who wrote the YAML."""


class ModelConfig(Section):
    path: str | None = Field(None, description="Hugging Face checkpoint directory of the policy; "
                             "null = build the embedded tiny model (SFT warm start, cached)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the learner's policy and the vLLM engine (bfloat16 on GPUs)")
    tokenizer: str | None = Field(None, description="tokenizer directory; null = the one in model.path")
    cache_dir: str = Field(".relay_cache", description="where the embedded default policy (and the builtin "
                           "task's files) are built and cached")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the embedded tiny model")

    @model_validator(mode="after")
    def _checkpoint(self) -> ModelConfig:
        # A path missing here may be on the cluster's nodes (the driver checks it); one that is here must be a
        # checkpoint, and saying so now spares starting Ray first.
        path = Path(self.path) if self.path is not None else None
        if path is not None and path.exists() and not (path / "config.json").is_file():
            what = "no config.json in it" if path.is_dir() else "no config.json: it is a file"
            raise ValueError(f"model.path {self.path!r} is not a Hugging Face checkpoint directory ({what}); point "
                             "it at a directory written by save_pretrained, or set it to null for the embedded model")
        tok = self.tokenizer
        if tok is not None and not Path(tok).is_dir() and (Path(tok).exists() or tok.startswith(("/", ".", "~"))):
            what = "is a file" if Path(tok).exists() else "does not exist"
            raise ValueError(f"model.tokenizer {tok!r} {what}; give a directory holding a tokenizer (a checkpoint "
                             "directory), or null for the one in model.path")
        return self


class TrainConfig(Section):
    steps: int = Field(2000, ge=1, description="RL steps (one batch of prompts each)")
    time_limit_s: float | None = Field(600.0, gt=0, description="stop after this many seconds of RL; null = no limit")
    prompts_per_step: int = Field(64, ge=1, description="prompts per step (times samples_per_prompt rollouts)")
    eval_every: int = Field(20, ge=1, description="greedy held-out evaluation every this many steps")
    eval_prompts: int = Field(500, ge=1, description="held-out prompts per evaluation, at most (the first of "
                              "each eval set)")
    eval_reward: list[RewardSourceConfig] | None = Field(
        None, description="reward sources whose weighted sum is the held-out score (eval/task_score); null = the "
                          "training reward. relay pipeline sets it to reward.sources when the RL stage trains on "
                          "a learned reward model")
    eval_k: int = Field(0, ge=0, description="also sample k responses per held-out prompt for pass@k and mean@k "
                        "(0 = off)")
    eval_pass_threshold: float = Field(1.0, description="a sample passes (pass@k) when its held-out score is at "
                                       "least this")
    seed: int = Field(0, description="seed of prompt order, and of the sampling seeds in deterministic mode")
    deterministic: bool = Field(False, description="reproducible on CPU: each prompt's sampling seed derives from "
                                "(seed, step, group id), so a resumed run equals an uninterrupted one. Needs "
                                "algorithm.max_staleness 0")
    run_dir: str = Field("runs/latest", description="where metrics.jsonl, checkpoints and the report go")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save a full checkpoint (Hugging Face policy plus everything a resume "
                       "needs) every this many steps; 0 = by time only")
    every_s: float | None = Field(1800.0, gt=0, description="also save one when this many seconds have passed since "
                                  "the last; null = by step only. A run always saves at the end and on SIGTERM/Ctrl-C")
    keep_last: int = Field(2, ge=1, description="step checkpoints kept on disk (older ones are deleted); the final "
                           "one is always kept")
    keep_versions: int = Field(2, ge=1, description="published weight versions kept in the object store (not on disk)")


REPORT_TO = ("tensorboard", "wandb", "mlflow")
"""the experiment trackers metrics.report_to may name (core/report.py writes them)"""


class MetricsConfig(Section):
    jsonl: bool = Field(True, description="write every step's metrics to run_dir/metrics.jsonl")
    prometheus: bool = Field(True, description="export relay_* metrics through ray.util.metrics")
    progress: bool = Field(True, description="show the progress line: redrawn in place on a terminal; elsewhere "
                           "(a job log) one line at the first step and at each evaluation")
    report_to: list[str] = Field(
        [], description="also write every step's metrics to these trackers: tensorboard (run_dir/tensorboard), "
                        "wandb (offline, under run_dir/wandb), mlflow (a local store, run_dir/mlruns); each needs "
                        "its package (pip install 'relay-rl[report]')")
    log_to_driver: bool = Field(False, description="print the actors' and reward replicas' stdout/stderr on the "
                                "driver's console too; by default they go only to files in the Ray session's log "
                                "directory (printed at start; a local run links it as run_dir/logs)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value  # --set metrics.report_to=tensorboard

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in REPORT_TO:
                raise ValueError(f"metrics.report_to: unknown tracker {name!r} (allowed: {', '.join(REPORT_TO)})")
        if len(set(names)) < len(names):
            raise ValueError(f"metrics.report_to {names} names a tracker twice")
        return names


class ClusterConfig(Section):
    address: str | None = Field(None, description="Ray address; null = join the job's cluster if there is one, "
                                "else start a local Ray")
    local_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (null = the cores, "
                                       "or the most the learner, actors and reward replicas may ask for where "
                                       "that is more: generation.max_num_actors, autoscaled sources at their most "
                                       "replicas)")
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description="local Ray's metrics port; null = Ray's")
    pin_cores: bool = Field(True, description="a local CPU run that generates and learns at once (max_staleness >= "
                            "1) pins each generation actor to cores of its own and the learner, driver, reward "
                            "replicas and Ray's daemons to the rest, when the threads fit the cores")


class PipelineConfig(Section):
    stages: list[Literal["sft", "rm", "rl", "dpo"]] = Field(
        ["sft", "rm", "rl"], description="stages of relay pipeline, in order: sft, rm, rl, dpo. Without rm, the rl "
                                         "stage trains on reward.sources (your function or rule) instead of a learned "
                                         "RM; [sft, dpo] = DPO on pairs judged by the reward (the RM with rm)")

    @model_validator(mode="after")
    def _ordered(self) -> PipelineConfig:
        order = ["sft", "rm", "rl", "dpo"]
        if not self.stages or self.stages != sorted(set(self.stages), key=order.index):
            raise ValueError(f"pipeline.stages {self.stages} must be a non-empty subset of {order}, in that order, "
                             "each once")
        return self


class RelayConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    reward_model: RewardModelTrainConfig = Field(default_factory=RewardModelTrainConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rwr: RWRConfig = Field(default_factory=RWRConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        if self.data.train is None:  # the builtin task's sizes are known now; a file's when it is read
            add = self.data.addition
            if self.train.eval_prompts > add.n_eval:
                raise ValueError(f"train.eval_prompts ({self.train.eval_prompts}) exceeds data.addition.n_eval "
                                 f"({add.n_eval})")
            if self.train.prompts_per_step > add.n_train:
                raise ValueError(f"train.prompts_per_step ({self.train.prompts_per_step}) exceeds "
                                 f"data.addition.n_train ({add.n_train}): the dataset is too small for one step")
            if self.reward_model.n_pairs is not None and self.reward_model.n_pairs > add.n_train:
                raise ValueError(f"reward_model.n_pairs ({self.reward_model.n_pairs}) exceeds data.addition.n_train "
                                 f"({add.n_train}): one synthetic pair per training prompt at most; lower it or "
                                 f"leave it null")
        if self.model.path is None and self.generation.max_model_len > self.model.tiny.max_position_embeddings:
            raise ValueError(f"generation.max_model_len ({self.generation.max_model_len}) exceeds the tiny model's "
                             f"model.tiny.max_position_embeddings ({self.model.tiny.max_position_embeddings}); "
                             "raise the latter (the tiny model is built for your data)")
        if self.data.chat_template and self.model.path is None and self.model.tokenizer is None:
            raise ValueError("data.chat_template needs a tokenizer with a chat template: the embedded tiny model "
                             "has none. Set model.path (or model.tokenizer), or use data.template")
        if self.generation.num_gpus == 0 and self.generation.tensor_parallel_size > 1:
            raise ValueError("generation.tensor_parallel_size > 1 needs generation.num_gpus > 0")
        if self.generation.partial_rollouts and self.algorithm.max_staleness == 0:
            raise ValueError("generation.partial_rollouts swaps in weights published while a response is being "
                             "sampled, which only the streaming loop does (algorithm.max_staleness >= 1); with "
                             "max_staleness 0 weights never change mid-generation. Set max_staleness to 1 or more, or "
                             "partial_rollouts to false")
        if self.train.deterministic and self.algorithm.max_staleness > 0:
            raise ValueError(f"train.deterministic collects every step's rollouts from the weights of the step "
                             f"before; algorithm.max_staleness={self.algorithm.max_staleness} samples ahead with "
                             "older ones. Set max_staleness to 0, or deterministic to false")
        self._one_sample_per_prompt()
        return self

    def _one_sample_per_prompt(self) -> None:
        """With one sample per prompt every group is a singleton: group baselines give advantage 0, and the
        uniform-group filter (all but ppo) drops every sample."""
        if self.generation.samples_per_prompt > 1:
            return
        name = self.algorithm.name
        if name in ("grpo", "drgrpo", "rloo"):
            raise ValueError(f"algorithm.name={name} compares the responses to one prompt, so it needs "
                             "generation.samples_per_prompt >= 2 (got 1); raise it, or use reinforce or ppo")
        if name != "ppo" and self.algorithm.drop_uniform_groups:
            raise ValueError("algorithm.drop_uniform_groups drops every group of one sample, and "
                             "generation.samples_per_prompt is 1: nothing would be trained on. Set "
                             "drop_uniform_groups to false or raise samples_per_prompt")


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (so 3 is an int, null is None)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set generation.num_actors=2")
    if not all(part.strip() for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: {key.strip()!r} has an empty part; a key is section.name, "
                          "e.g. --set generation.num_actors=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({_yaml_problem(e)}); quote it, "
                          "e.g. --set 'data.template=\"Q: {question}\"'") from None
    return key.strip(), value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error in one line, e.g. "expected ',' or '}', but got '<stream end>' at line 2, column 1"."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden" and key.split(".")[0] == "task":
        return ("unknown key 'task': the task section became data (data.train for your file; the embedded "
                "task's sizes are data.addition.n_train, n_eval, digits, seed)")
    if error["type"] == "extra_forbidden":
        parent_loc, leaf = error["loc"][:-1], str(error["loc"][-1])
        model: type[BaseModel] = RelayConfig
        for part in parent_loc:
            field = model.model_fields.get(str(part))
            ann = getattr(field, "annotation", None) if field else None
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                model = None
                break
            model = ann
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(leaf, allowed, n=1)
        hint = f"; did you mean {'.'.join([*map(str, parent_loc), close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint} (allowed here: {', '.join(allowed)})" if allowed else f"unknown key {key!r}"
    value = error.get("input")
    if error["type"] == "value_error":  # a validator's message names its keys already
        msg = error["msg"].removeprefix("Value error, ")
        section = ".".join(str(p) for p in error["loc"] if not isinstance(p, int))
        return msg if section in msg else f"{key}: {msg}"
    if error["type"] == "model_type" and value is None:
        return f"{key}: the section is empty (null); give it keys or delete its line"
    if isinstance(value, dict):
        shown = f" (got a section: {{{', '.join(map(str, value))}}})" if error["type"].endswith("_type") else ""
    else:
        shown = f" (got {value!r})"
    return f"{key}: {error['msg']}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RelayConfig:
    """Read YAML (or nothing: the embedded default), apply ``--set`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {str(path)!r} is a directory; give the experiment's YAML file, "
                              "e.g. --config cluster/local.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist (relative paths are read from the "
                              f"directory relay runs in: {Path.cwd()})")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(e)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must be a mapping of sections, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides:
        _set_dotted(tree, *parse_override(text))
    try:
        return RelayConfig.model_validate(tree)
    except ValidationError as e:
        lines = [_describe(err) for err in e.errors()]
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n  " + "\n  ".join(lines)) from None


def reference_table() -> str:
    """Markdown table of every configuration key, its default and its description (the README's)."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def item_model(ann) -> type[BaseModel] | None:
        """The section model inside ``list[M]`` or ``M | None`` (the keys of each item are listed after it)."""
        for arg in typing.get_args(ann):
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                return arg
            if typing.get_args(arg):
                return item_model(arg)
        return None

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            if field.is_required():
                shown = "required"
            elif name == "backbone":
                shown = "the packaged MiniLM"
            elif isinstance(default, list) and default and isinstance(default[0], BaseModel):
                items = [d.model_dump(exclude_defaults=True) for d in default]
                shown = f"`{yaml.safe_dump(items, default_flow_style=True).strip()}`"
            else:
                dumped = yaml.safe_dump(default, default_flow_style=True).removesuffix("...\n").strip()
                shown = f"`{dumped}`"
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {shown} | {desc} |")
            if (inner := item_model(ann)) is not None and inner not in seen:
                seen.add(inner)
                walk(inner, f"{prefix}{name}{'[*]' if typing.get_origin(ann) is list else ''}.")

    seen: set[type[BaseModel]] = set()

    walk(RelayConfig, "")
    return "\n".join(rows)


# Keys a resumed run may change: budgets, placement, timeouts and logging. Any other change (the model, the
# data, the algorithm, the batch) would continue a different run, so --resume refuses it and names the key.
RESUMABLE = (
    "train.steps", "train.time_limit_s", "train.eval_every", "train.run_dir",
    "checkpoint.", "metrics.", "cluster.", "pipeline.", "reward.access_log", "generation.stream_chunk_prompts",
    "generation.num_actors", "generation.max_num_actors", "generation.num_cpus", "generation.num_gpus",
    "generation.timeout_s", "generation.start_timeout_s", "generation.max_restarts", "generation.torch_threads",
    "generation.kv_cache_gb", "generation.gpu_memory_utilization", "generation.enforce_eager",
    "learner.num_cpus", "learner.num_gpus", "learner.timeout_s", "learner.torch_threads", "learner.max_bad_steps",
    "learner.max_restores", "learner.num_workers", "learner.placement", "learner.collective_timeout_s",
    "dpo.steps", "dpo.time_limit_s", "dpo.eval_every", "rwr.steps", "rwr.time_limit_s", "rwr.eval_every",
    "reward.timeout_s", "reward.max_retries",
    "reward.deploy_timeout_s",
    "reward.http_enabled", "reward.http_port", "reward.http_host",
)


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return out


def resume_config(run_dir: str | Path, path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> RelayConfig:
    """The config to continue ``run_dir`` with: the run's own (``config.json``), or ``path`` when given, plus
    ``overrides``; refused, naming the key, where it changes what the run trains (``RESUMABLE``)."""
    saved_path = Path(run_dir) / "config.json"
    if not saved_path.is_file():
        what = "does not exist" if not Path(run_dir).exists() else "is a file" if not Path(run_dir).is_dir() else \
            "holds no run (no config.json)"
        raise ConfigError(f"--resume: {str(run_dir)!r} {what}; give the train.run_dir of a run that was started, "
                          "or start one without --resume")
    saved = load_config(saved_path)
    cfg = load_config(path or saved_path, [*overrides, f"train.run_dir={run_dir}"])
    check_resumable(saved, cfg, run_dir)
    return cfg


def check_resumable(saved: RelayConfig, cfg: RelayConfig, run_dir: str | Path) -> None:
    """Refuse to continue the run saved with ``saved`` under ``cfg`` if a key outside ``RESUMABLE`` changed."""
    sharded = [c.learner.strategy == "fsdp" and c.learner.num_workers > 1 for c in (saved, cfg)]
    if sharded[0] != sharded[1]:
        how = ["fsdp over learner.num_workers > 1" if x else "one learner or ddp" for x in sharded]
        raise ConfigError(f"--resume: the run in {run_dir} was written by {how[0]} and would continue with {how[1]}; "
                          "their optimizer states differ (sharded, gathered by name, against one per parameter). Keep "
                          "learner.strategy and whether num_workers > 1 as they were; the number of ranks may change")
    before, after = _flatten(saved.model_dump()), _flatten(cfg.model_dump())
    changed = [k for k in sorted(set(before) | set(after))
               if before.get(k) != after.get(k) and not k.startswith(RESUMABLE)]
    if changed:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed[:5])
        raise ConfigError(f"--resume: the run in {run_dir} cannot continue with a changed {changed[0]} ({shown}): it "
                          "would train something else. Undo the change, or start a new train.run_dir. Budgets, "
                          "placement, timeouts and logging may change (train.steps, train.time_limit_s, "
                          "generation.num_actors, ...)")
