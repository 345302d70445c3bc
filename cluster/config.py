"""The one configuration schema, grouped by component, loaded from YAML with ``--set`` overrides.

Every field is documented where it is declared. Unknown keys, wrong types and impossible
values fail in ``load_config`` (before Ray starts) with a ``ConfigError`` naming the key.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.tasks import TaskConfig
from learner.algos import ADVANTAGE_ESTIMATORS
from learner.bootstrap import TinyModelConfig
from learner.sft import SFTConfig
from reward_service.config import RewardConfig, RewardModelTrainConfig


class ConfigError(ValueError):
    """A configuration problem, with a message meant for the person who wrote the YAML."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    path: str | None = Field(None, description="Hugging Face checkpoint directory of the policy; "
                             "null = build the embedded tiny model (SFT warm start, cached)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the learner's policy and the vLLM engine (bfloat16 on GPUs)")
    cache_dir: str = Field(".relay_cache", description="where the embedded default policy is built and cached")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="the embedded tiny model")


class GenerationConfig(_Section):
    num_actors: int = Field(1, ge=1, description="vLLM generation actors; prompts are sharded across them")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs per generation actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per generation actor (= tensor_parallel_size on GPUs)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallel degree (GPU only)")
    samples_per_prompt: int = Field(8, ge=1, description="responses per prompt (the GRPO group size)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(6, ge=1, description="maximum response tokens")
    max_model_len: int = Field(64, ge=8, description="prompt + response token limit of the engine")
    kv_cache_gb: int = Field(1, ge=1, description="CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vLLM GPU memory share (GPU only)")
    enforce_eager: bool = Field(True, description="skip CUDA graph capture / compilation (faster start)")
    torch_threads: int | None = Field(2, ge=1, description="CPU engine threads; null = num_cpus rounded. 2 suits "
                                      "the 2-core default, where generation and learning alternate")
    seed: int = Field(0, description="sampling seed of actor 0 (actor i uses seed + i)")
    timeout_s: float = Field(300.0, gt=0, description="timeout of one generate or weight-load call, seconds")
    max_restarts: int = Field(2, ge=0, description="times Ray restarts a crashed generation actor")

    @property
    def engine_threads(self) -> int:
        """Torch threads each engine runs with on CPU."""
        return self.torch_threads or max(1, round(self.num_cpus))


class AlgorithmConfig(_Section):
    name: Literal["grpo", "drgrpo", "rloo", "reinforce", "ppo"] = Field(
        "grpo", description="grpo | drgrpo | rloo | reinforce | ppo (ppo adds a critic and uses GAE)")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator (Schulman's note)")
    kl_in: Literal["none", "reward", "loss"] = Field(
        "none", description="none | reward (subtracted per token from the reward) | loss (added with kl_coef)")
    kl_coef: float = Field(0.02, ge=0, description="KL coefficient (initial value when kl_target is set)")
    kl_target: float | None = Field(None, gt=0, description="adaptive KL controller target; null = fixed coef")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL controller horizon, in samples")
    gamma: float = Field(1.0, ge=0, le=1, description="discount over response tokens")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo)")
    clip_low: float = Field(0.2, gt=0, lt=1, description="PPO ratio clip below 1")
    clip_high: float = Field(0.2, gt=0, description="PPO ratio clip above 1 (clip-higher when > clip_low)")
    dual_clip: float | None = Field(None, gt=1, description="dual-clip bound for negative advantages; null = off")
    tis_cap: float | None = Field(2.0, gt=0, description="truncated importance weight cap for the "
                                  "sampler/learner mismatch; null = off")
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="how per-token losses become one number")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus coefficient")
    drop_uniform_groups: bool = Field(True, description="drop groups whose samples all scored the same")
    max_staleness: int = Field(0, ge=0, description="0 = on-policy; s = actors may sample up to s versions ahead")

    @model_validator(mode="after")
    def _known(self) -> AlgorithmConfig:
        estimator = "gae" if self.name == "ppo" else self.name
        if estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"algorithm.name {self.name!r} has no advantage estimator; "
                             f"valid: {sorted(ADVANTAGE_ESTIMATORS)}")
        return self


class LearnerConfig(_Section):
    lr: float = Field(1e-4, gt=0, description="peak AdamW learning rate of the policy")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps, then constant")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="global gradient-norm clip")
    epochs: int = Field(1, ge=1, description="passes over each step's rollouts")
    minibatch_size: int = Field(512, ge=1, description="sequences per optimizer step")
    micro_batch_size: int = Field(512, ge=1, description="sequences per forward/backward (gradient accumulation)")
    critic_backbone: Literal["separate", "shared"] = Field(
        "separate", description="ppo critic: separate = its own model (critic_init, critic_lr); shared = a value "
                                "head on the policy's last hidden state, trained with loss + value_coef * value loss "
                                "(less memory and time, but +4.6 points against +24.8 for separate in the README run)")
    value_coef: float = Field(0.5, ge=0, description="weight of the value loss in the joint loss "
                              "(critic_backbone=shared)")
    critic_lr: float = Field(1e-4, gt=0, description="learning rate of the critic's backbone (ppo)")
    critic_head_lr: float = Field(1e-3, gt=0, description="learning rate of the critic's value head (ppo); a zero "
                                  "head at 1e-4 had not moved off a constant after 140 steps")
    critic_init: str | None = Field(None, description="checkpoint the critic starts from (ppo): null = the policy "
                                    "with a zero head; a reward-model directory = its backbone and head (InstructGPT). "
                                    "relay pipeline sets the RM it trained")
    value_clip: float | None = Field(0.2, gt=0, description="value clipping range; null = off")
    num_cpus: float = Field(1.0, ge=0, description="logical CPUs of the learner actor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs of the learner actor")
    torch_threads: int | None = Field(2, ge=1, description="torch intra-op threads in the learner; "
                                      "null = Ray's default (num_cpus)")
    timeout_s: float = Field(600.0, gt=0, description="timeout of one learner call, seconds")

    @model_validator(mode="after")
    def _batches(self) -> LearnerConfig:
        if self.minibatch_size % self.micro_batch_size:
            raise ValueError(f"learner.minibatch_size ({self.minibatch_size}) must be a multiple of "
                             f"learner.micro_batch_size ({self.micro_batch_size})")
        if self.critic_init is not None and self.critic_backbone == "shared":
            raise ValueError("learner.critic_init applies to a separate critic; with learner.critic_backbone=shared "
                             "the value head sits on the policy. Set critic_init to null or critic_backbone=separate")
        if self.critic_init is not None and not Path(self.critic_init).is_dir():
            raise ValueError(f"learner.critic_init {self.critic_init!r} is not a directory; give a reward-model or "
                             f"policy checkpoint directory, or null to start the critic from the policy")
        return self


class TrainConfig(_Section):
    steps: int = Field(2000, ge=1, description="RL steps (one batch of prompts each)")
    time_limit_s: float | None = Field(600.0, gt=0, description="stop after this many seconds of RL; null = no limit")
    prompts_per_step: int = Field(64, ge=1, description="prompts per step (times samples_per_prompt rollouts)")
    eval_every: int = Field(20, ge=1, description="greedy held-out evaluation every this many steps")
    eval_prompts: int = Field(500, ge=1, description="held-out prompts per evaluation (<= task.n_eval)")
    seed: int = Field(0, description="seed of prompt order")
    run_dir: str = Field("runs/latest", description="where metrics.jsonl, checkpoints and the report go")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save a Hugging Face checkpoint every this many steps; 0 = only at the end")
    keep_versions: int = Field(2, ge=1, description="published weight versions kept in the object store")


class MetricsConfig(_Section):
    jsonl: bool = Field(True, description="write every step's metrics to run_dir/metrics.jsonl")
    prometheus: bool = Field(True, description="export relay_* metrics through ray.util.metrics")
    progress: bool = Field(True, description="print a progress line per step")


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address; null = join the job's cluster if there is one, "
                                "else start a local Ray")
    local_num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (null = all cores, "
                                       "at least 4 logical so the default placement fits)")
    metrics_export_port: int | None = Field(None, ge=1, le=65535, description="local Ray's metrics port; null = Ray's")


class RelayConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
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

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        if self.train.eval_prompts > self.task.n_eval:
            raise ValueError(f"train.eval_prompts ({self.train.eval_prompts}) exceeds task.n_eval ({self.task.n_eval})")
        if self.train.prompts_per_step > self.task.n_train:
            raise ValueError(f"train.prompts_per_step ({self.train.prompts_per_step}) exceeds task.n_train "
                             f"({self.task.n_train}): the dataset is too small for one step")
        if self.reward_model.n_pairs is not None and self.reward_model.n_pairs > self.task.n_train:
            raise ValueError(f"reward_model.n_pairs ({self.reward_model.n_pairs}) exceeds task.n_train "
                             f"({self.task.n_train}): one synthetic pair per training prompt at most; lower it or "
                             f"leave it null")
        if self.generation.num_gpus == 0 and self.generation.tensor_parallel_size > 1:
            raise ValueError("generation.tensor_parallel_size > 1 needs generation.num_gpus > 0")
        return self


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
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None
    return key.strip(), value


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
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
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {error['msg']}{shown}"


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RelayConfig:
    """Read YAML (or nothing: the embedded default), apply ``--set`` overrides, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
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

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
                continue
            default = field.get_default(call_default_factory=True)
            if name == "backbone":
                shown = "the packaged MiniLM"
            elif isinstance(default, list):
                shown = "(see below)"
            else:
                dumped = yaml.safe_dump(default).removesuffix("...\n").strip()
                shown = f"`{dumped}`"
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {shown} | {desc} |")

    walk(RelayConfig, "")
    return "\n".join(rows)
