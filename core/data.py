"""The data layer: prompt datasets from files, one record format for SFT, RL, reward and evaluation.

A source is a local file (JSONL, JSON, Parquet, CSV) or a directory written by ``datasets``'
``save_to_disk``, read with the ``datasets`` library. Each row becomes an :class:`Example`: the
prompt (a string, or chat messages ``[{role, content}]``), an optional SFT completion, and every
other column as metadata that travels to the reward and to evaluation (``answer``, ``tests``...).

Three steps, so that bad data fails before Ray starts and formatting uses the policy's tokenizer:

1. :func:`load_splits` (no tokenizer): read, validate fields, split train / held-out by prompt.
2. :func:`format_prompt` (tokenizer): a ``{field}`` template or the tokenizer's chat template,
   with an optional system prompt; vLLM, the learner and the reward all see this text.
3. the driver tokenises the formatted prompts and drops (or refuses) those that do not fit.

``data.builtin: addition`` (the default when no ``train`` is given) writes the embedded addition
task as JSONL in this format and reads it back through the same path.

Simplifications, on purpose: metadata values are strings (non-strings are JSON-encoded, so a list
of tests arrives as a JSON string); the held-out split is by the prompt's raw text (a chat
prompt's JSON), so two rows with the same prompt always land on the same side.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from core.section import Section

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """Bad data: the message names the file, the line or field, and what to do."""


class SourceConfig(Section):
    """One dataset file or ``save_to_disk`` directory."""

    path: str = Field(description="JSONL, JSON, Parquet or CSV file, or a datasets save_to_disk directory")
    name: str | None = Field(None, description="name of this set in metrics (eval sets); null = the file's stem")
    split: str = Field("train", description="split to read when the directory holds a DatasetDict")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem


class AdditionConfig(Section):
    """The embedded task: ``"23+58="`` -> ``"81"``, train and held-out generated from a seed, disjoint."""

    digits: int = Field(2, ge=1, le=6, description="digits of each operand")
    n_train: int = Field(7600, ge=1, description="training prompts (7600 + 500 = all 8100 two-digit problems; "
                         "with 4000 the SFT memorised its prompts and RL did not generalise)")
    n_eval: int = Field(500, ge=1, description="held-out prompts, disjoint from the training ones")
    seed: int = Field(0, description="seed of the prompt sets")


class DataConfig(Section):
    """Where prompts come from and how they are formatted. SFT, RL, the RM stage and evaluation all read it."""

    builtin: Literal["addition"] | None = Field(None, description="the embedded task, used when data.train is null")
    addition: AdditionConfig = Field(default_factory=AdditionConfig, description="the embedded addition task")
    train: SourceConfig | None = Field(None, description="training prompts: {path: FILE} (or just FILE); "
                                       "null = data.builtin (addition)")
    eval: list[SourceConfig] = Field(default_factory=list, description="held-out sets (the first is the main "
                                     "one); empty = data.eval_fraction of train, split by prompt")
    eval_fraction: float = Field(0.05, gt=0, lt=1, description="share of train's distinct prompts held out when "
                                 "no eval set is given")
    max_samples: int | None = Field(None, ge=1, description="keep at most this many training rows (a seeded "
                                    "random subset)")
    shuffle_seed: int = Field(0, description="seed of the max_samples subset and of the held-out split")
    prompt_field: str = Field("prompt", description="column with the prompt: a string or chat messages")
    completion_field: str | None = Field("completion", description="column with the SFT target; chat prompts "
                                         "may instead end with an assistant turn")
    template: str | None = Field(None, description="prompt template with {field} placeholders, e.g. "
                                 "'Q: {question}\\nA:'; null = the prompt field as it is")
    chat_template: bool = Field(False, description="format with the tokenizer's chat template "
                                "(add_generation_prompt=True)")
    system_prompt: str | None = Field(None, description="system message put first (chat template only)")
    on_invalid: Literal["error", "skip"] = Field("error", description="a bad record (missing field, not UTF-8, "
                                                 "prompt too long): stop with an error, or skip it and count it")

    @field_validator("train", mode="before")
    @classmethod
    def _path_shorthand(cls, v):
        return {"path": v} if isinstance(v, str) else v

    @field_validator("eval", mode="before")
    @classmethod
    def _eval_shorthand(cls, v):
        if v is None:
            return []
        items = v if isinstance(v, list) else [v]
        return [{"path": x} if isinstance(x, str) else x for x in items]

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.train is not None and self.builtin is not None:
            raise ValueError("give data.train (your file) or data.builtin (the embedded task), not both")
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("data.system_prompt needs data.chat_template: true (put it in data.template otherwise)")
        if self.template is not None and self.chat_template:
            raise ValueError("give data.template or data.chat_template, not both")
        for src in [self.train, *self.eval]:
            if src is not None and not Path(src.path).exists():
                raise ValueError(f"data file {src.path!r} does not exist (relative paths are read from the "
                                 f"directory relay runs in: {Path.cwd()})")
        labels = [s.label for s in self.eval]
        if len(set(labels)) < len(labels):
            raise ValueError(f"data.eval: two sets share a name ({labels}); give each a distinct 'name'")
        return self


@dataclass(frozen=True)
class Example:
    """One record of a dataset, before prompt formatting."""

    prompt: str | list[dict]
    """the prompt field: text, or chat messages [{role, content}] (a final assistant turn removed)"""
    completion: str | None
    """the SFT target (completion field, or the chat prompt's final assistant turn); None if absent"""
    metadata: dict[str, str] = field(default_factory=dict)
    """every other column, as strings (non-strings JSON-encoded), e.g. {"answer": "81"}"""

    @property
    def key(self) -> str:
        """Identity of the prompt for splitting: its text, or its messages as JSON."""
        return self.prompt if isinstance(self.prompt, str) else json.dumps(self.prompt, sort_keys=True)


@dataclass
class Splits:
    """What :func:`load_splits` returns: training examples and the named held-out sets."""

    train: list[Example]
    eval: dict[str, list[Example]]  # name -> examples; the first is the main held-out set
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    @property
    def main_eval(self) -> list[Example]:
        return next(iter(self.eval.values()))


# ------------------------------------------------------------------------------------------ reading


def _is_blank(path: Path) -> bool:
    """True for an empty or whitespace-only file (read until the first other byte)."""
    with path.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _bad_lines(path: Path) -> dict[int, str]:
    """Line number -> what is wrong, for lines that are not UTF-8 or (JSONL) not JSON: ``datasets`` would only
    say that the file failed."""
    bad = {}
    for lineno, line in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            bad[lineno] = f"bytes that are not UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
            continue
        if path.suffix == ".jsonl" and text.strip():
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                bad[lineno] = f"not valid JSON ({e.msg}, column {e.colno})"
    return bad


def _without_bad_lines(path: Path, bad: dict[int, str], on_invalid: str, skipped: dict[str, int],
                       log: Callable[[str], object]) -> Path:
    """``path`` itself when every line is good; else an error (``on_invalid: error``) or a copy without the bad
    lines (``skip``), beside the cache of ``datasets``."""
    if not bad:
        return path
    first = min(bad)
    if on_invalid == "error":
        raise DataError(f"{path}:{first}: {bad[first]} (data.on_invalid: skip drops such lines)")
    for lineno, why in sorted(bad.items()):
        reason = why.split(" (")[0]
        skipped[reason] = skipped.get(reason, 0) + 1
        if skipped[reason] <= 3:
            log(f"data: skipped {path}:{lineno}: {why}")
    import tempfile

    lines = path.read_bytes().split(b"\n")
    clean = Path(tempfile.mkdtemp(prefix="relay-data-")) / path.name
    clean.write_bytes(b"\n".join(line for i, line in enumerate(lines, 1) if i not in bad))
    return clean


def read_rows(source: SourceConfig, on_invalid: str = "error", skipped: dict[str, int] | None = None,
              log: Callable[[str], object] = print) -> list[dict]:
    """Every row of ``source`` as a dict, read with ``datasets``; clear errors for a bad file. Lines that are
    not UTF-8 or not JSON follow ``on_invalid`` (counted in ``skipped``)."""
    import datasets

    path = Path(source.path)
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.is_dir():
        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{path} is a directory but not one written by datasets' save_to_disk; give a data file "
                            f"({', '.join(sorted(FORMATS))}) or such a directory") from None
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise DataError(f"{path} holds splits {sorted(ds)}, not {source.split!r}; set the source's 'split'")
            ds = ds[source.split]
    else:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown format {path.suffix!r}; use one of {sorted(FORMATS)} or a "
                            "save_to_disk directory")
        if _is_blank(path):  # datasets would fail with a bare StopIteration
            raise DataError(f"{path}: the file is empty")
        if fmt in ("json", "csv"):
            path = _without_bad_lines(path, _bad_lines(path), on_invalid, {} if skipped is None else skipped, log)
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types; name the file and the cause
            cause = e.__cause__ or e
            raise DataError(f"{path}: could not be read as {fmt} ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0][:200] if str(cause) else ''})") from None
        finally:
            if path != Path(source.path):  # the copy without bad lines
                import shutil

                shutil.rmtree(path.parent, ignore_errors=True)
    rows = ds.to_list()
    if not rows:
        raise DataError(f"{path}: the dataset is empty")
    return rows


def _as_metadata(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def to_example(row: dict, cfg: DataConfig) -> Example:
    """One row -> Example; raises DataError naming a missing field and the columns that exist."""
    if cfg.prompt_field not in row or row[cfg.prompt_field] is None:
        raise DataError(f"missing prompt field {cfg.prompt_field!r}; the columns are {sorted(row)}. "
                        "Set data.prompt_field")
    prompt = row[cfg.prompt_field]
    completion = None
    if isinstance(prompt, list):
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                   for m in prompt) or not prompt:
            raise DataError(f"prompt field {cfg.prompt_field!r} is a list but not chat messages "
                            f"[{{role, content}}]: {str(prompt)[:120]}")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if prompt[-1]["role"] == "assistant":
            completion, prompt = prompt[-1]["content"], prompt[:-1]
            if not prompt:
                raise DataError("a chat prompt holds only an assistant turn")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"prompt field {cfg.prompt_field!r} must be a non-empty string or chat messages, "
                        f"got {str(prompt)[:80]!r}")
    if cfg.completion_field and row.get(cfg.completion_field) is not None:
        completion = str(row[cfg.completion_field])
    metadata = {k: _as_metadata(v) for k, v in row.items() if k != cfg.prompt_field and v is not None}
    if cfg.template is not None:  # template fields (the prompt included) reach formatting through metadata
        fields = _template_fields(cfg.template)
        missing = [f for f in fields if f not in row]
        if missing:
            raise DataError(f"data.template uses field(s) {missing} that the record lacks; the columns are "
                            f"{sorted(row)}")
        metadata.update({f: _as_metadata(row[f]) for f in fields})
    return Example(prompt, completion, metadata)


def _template_fields(template: str) -> list[str]:
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _examples(rows: list[dict], cfg: DataConfig, where: str, skipped: dict[str, int],
              log: Callable[[str], object]) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(to_example(row, cfg))
        except DataError as e:
            if cfg.on_invalid == "error":
                raise DataError(f"{where}, record {i}: {e} (data.on_invalid: skip drops such records)") from None
            reason = str(e).split(";")[0].split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
            if skipped[reason] <= 3:
                log(f"data: skipped {where} record {i}: {e}")
    if not out:
        raise DataError(f"{where}: no valid records")
    return out


def split_by_prompt(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held-out): ``fraction`` of the distinct prompts (at least one) held out, all their rows with them."""
    keys = sorted({e.key for e in examples})
    if len(keys) < 2:
        raise DataError(f"only {len(keys)} distinct prompt(s): too few to hold any out; give data.eval")
    random.Random(seed).shuffle(keys)
    held = set(keys[: max(1, round(len(keys) * fraction))])
    return [e for e in examples if e.key not in held], [e for e in examples if e.key in held]


def load_splits(cfg: DataConfig, cache_dir: str | Path = ".relay_cache",
                log: Callable[[str], object] = print) -> Splits:
    """Read, validate and split the configured data. No tokenizer, no Ray: bad data fails here."""
    train_src = cfg.train or write_builtin(cfg.addition, Path(cache_dir))
    eval_srcs = cfg.eval if cfg.train is not None else [builtin_eval_source(cfg.addition, Path(cache_dir))]
    skipped: dict[str, int] = {}
    train = _examples(read_rows(train_src, cfg.on_invalid, skipped, log), cfg, train_src.path, skipped, log)
    if eval_srcs:
        evals = {s.label: _examples(read_rows(s, cfg.on_invalid, skipped, log), cfg, s.path, skipped, log)
                 for s in eval_srcs}
        held = {e.key for ex in evals.values() for e in ex}
        kept = [e for e in train if e.key not in held]
        if len(kept) < len(train):  # never train on a held-out prompt
            log(f"data: dropped {len(train) - len(kept)} training rows whose prompt is in an eval set")
            train = kept
    else:
        train, held_out = split_by_prompt(train, cfg.eval_fraction, cfg.shuffle_seed)
        evals = {"heldout": held_out}
    if cfg.max_samples is not None and cfg.max_samples < len(train):  # a seeded subset, in file order
        picked = sorted(random.Random(cfg.shuffle_seed).sample(range(len(train)), cfg.max_samples))
        train = [train[i] for i in picked]
    if not train:
        raise DataError(f"{train_src.path}: no training rows left after removing held-out prompts")
    if skipped:
        log(f"data: skipped {sum(skipped.values())} invalid records: {skipped}")
    return Splits(train, evals, skipped)


# --------------------------------------------------------------------------------------- formatting


def format_prompt(example: Example, cfg: DataConfig, tokenizer=None) -> str:
    """The prompt text every component sees (template, chat template, or the prompt as it is)."""
    if cfg.chat_template:
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("data.chat_template is true but the tokenizer has no chat template; set "
                            "model.tokenizer to one that has, or use data.template")
        messages = [{"role": "user", "content": example.prompt}] if isinstance(example.prompt, str) \
            else list(example.prompt)
        if cfg.system_prompt is not None:
            messages = [{"role": "system", "content": cfg.system_prompt}, *messages]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(example.prompt, list):
        raise DataError("the prompt is chat messages: set data.chat_template: true to format them")
    if cfg.template is not None:
        return cfg.template.format(**{**example.metadata, cfg.prompt_field: example.prompt})
    return example.prompt


# ----------------------------------------------------------------------------------- the builtin task


def make_addition(cfg: AdditionConfig) -> tuple[list[dict], list[dict]]:
    """Disjoint train and held-out rows ``{prompt: "a+b=", answer, completion}`` (completion = answer, the SFT
    target) with ``digits``-digit operands."""
    lo, hi = 10 ** (cfg.digits - 1), 10**cfg.digits - 1
    space = (hi - lo + 1) ** 2
    if cfg.n_train + cfg.n_eval > space:
        raise DataError(f"data.addition.n_train + n_eval = {cfg.n_train + cfg.n_eval} exceeds the {space} distinct "
                        f"{cfg.digits}-digit problems; lower them or raise data.addition.digits")
    rng = random.Random(cfg.seed)
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < cfg.n_train + cfg.n_eval:
        pairs.add((rng.randint(lo, hi), rng.randint(lo, hi)))
    ordered = sorted(pairs)
    rng.shuffle(ordered)
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b), "completion": str(a + b)} for a, b in ordered]
    return rows[: cfg.n_train], rows[cfg.n_train:]


def _builtin_dir(cfg: AdditionConfig, cache_dir: Path) -> Path:
    key = hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()[:12]
    return cache_dir / f"data-addition-{key}"


def write_builtin(cfg: AdditionConfig, cache_dir: Path) -> SourceConfig:
    """Write the addition task's train.jsonl and eval.jsonl (once) and return the train source."""
    out = _builtin_dir(cfg, cache_dir)
    if not (out / "eval.jsonl").is_file():
        train, held_out = make_addition(cfg)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train", train), ("eval", held_out)):
            tmp = out / f".{name}.jsonl.tmp"
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(out / f"{name}.jsonl")
    return SourceConfig(path=str(out / "train.jsonl"), name="addition")



def builtin_eval_source(cfg: AdditionConfig, cache_dir: Path) -> SourceConfig:
    write_builtin(cfg, cache_dir)
    return SourceConfig(path=str(_builtin_dir(cfg, cache_dir) / "eval.jsonl"), name="heldout")


def data_fingerprint(cfg: DataConfig) -> str:
    """Hash of the data config and the bytes of its files (cache key of a policy built from the data)."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    for src in [cfg.train, *cfg.eval]:
        if src is None:
            continue
        path = Path(src.path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in files:
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def exact_match(response: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace (the embedded task's true score)."""
    return response.strip() == answer.strip()


def sft_pairs(examples: Sequence[Example], cfg: DataConfig, tokenizer=None,
              log: Callable[[str], object] = print) -> list[tuple[str, str]]:
    """(formatted prompt, completion) pairs for SFT; a record without a completion follows ``data.on_invalid``."""
    pairs, missing = [], 0
    for e in examples:
        if e.completion is None:
            missing += 1
            continue
        pairs.append((format_prompt(e, cfg, tokenizer), e.completion))
    if missing and (cfg.on_invalid == "error" or not pairs):
        raise DataError(f"{missing} of {len(examples)} records have no completion for SFT: set "
                        f"data.completion_field (now {cfg.completion_field!r}) or end chat prompts with an "
                        "assistant turn" + ("; data.on_invalid: skip drops them" if pairs else ""))
    if missing:
        log(f"data: skipped {missing} records without a completion for SFT")
    return pairs
