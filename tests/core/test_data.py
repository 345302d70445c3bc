"""The data layer on real files: every format, the held-out split, formatting, and the errors a user sees."""

from __future__ import annotations

import json

import pytest

from core.data import (
    DataConfig,
    DataError,
    Example,
    format_prompt,
    load_splits,
    read_rows,
    sft_pairs,
    split_by_prompt,
)

ROWS = [{"question": f"{a}-{b}", "answer": str(a - b), "tests": [f"assert {a}"]} for a in range(10, 20)
        for b in range(10, 14)]  # 40 rows, 40 distinct prompts


def _write(path, rows, fmt):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    elif fmt == "csv":
        ds.remove_columns("tests").to_csv(str(path), index=False)
    else:
        ds.save_to_disk(str(path))
    return path


def _cfg(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), prompt_field="question", completion_field="answer", **kw)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "disk"])
def test_every_format_reads_the_same_records(tmp_path, fmt):
    path = _write(tmp_path / (f"d.{fmt}" if fmt != "disk" else "d"), ROWS, fmt)
    rows = read_rows(_cfg(path).train)
    assert [r["question"] for r in rows] == [r["question"] for r in ROWS]
    # CSV has no types: answers come back as ints; the data layer turns metadata into strings either way
    splits = load_splits(_cfg(path, eval_fraction=0.25), tmp_path)
    example = next(e for e in splits.train + splits.main_eval if e.prompt == "12-13")
    assert example.completion == "-1" and example.metadata["answer"] == "-1"
    if fmt != "csv":
        assert json.loads(example.metadata["tests"]) == ["assert 12"]  # non-strings travel JSON-encoded


def test_held_out_split_is_by_prompt_and_never_leaks(tmp_path):
    rows = ROWS + [dict(r, answer="dup") for r in ROWS[:10]]  # ten prompts appear twice
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    splits = load_splits(_cfg(path, eval_fraction=0.25, shuffle_seed=3), tmp_path)
    train_keys, eval_keys = {e.key for e in splits.train}, {e.key for e in splits.main_eval}
    assert not train_keys & eval_keys
    assert len(eval_keys) == 10 and len(splits.train) + len(splits.main_eval) == 50
    again = load_splits(_cfg(path, eval_fraction=0.25, shuffle_seed=3), tmp_path)
    assert [e.key for e in again.main_eval] == [e.key for e in splits.main_eval]  # seeded


def test_an_eval_file_removes_its_prompts_from_train_and_max_samples(tmp_path):
    train = _write(tmp_path / "train.jsonl", ROWS, "jsonl")
    held = _write(tmp_path / "eval.jsonl", ROWS[:5], "jsonl")
    logs: list[str] = []
    splits = load_splits(_cfg(train, eval=[{"path": str(held), "name": "mine"}], max_samples=20), tmp_path,
                         log=logs.append)
    assert list(splits.eval) == ["mine"] and len(splits.main_eval) == 5
    assert len(splits.train) == 20 and not {e.key for e in splits.train} & {e.key for e in splits.main_eval}
    assert any("dropped 5 training rows" in line for line in logs)


def test_missing_field_names_the_columns(tmp_path):
    path = _write(tmp_path / "d.jsonl", ROWS, "jsonl")
    with pytest.raises(DataError, match=r"missing prompt field 'prompt'; the columns are \['answer', 'question', "
                                        r"'tests'\]"):
        load_splits(DataConfig(train=str(path)), tmp_path)


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1-1", "answer": "0"}\n{"question": "2-1", \n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        load_splits(_cfg(path), tmp_path)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"question": "1-1", "answer": "0"}\n{"question": "\xff\xfe", "answer": "0"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: bytes that are not UTF-8"):
        load_splits(_cfg(path), tmp_path)


def test_skip_drops_bad_lines_and_counts_them(tmp_path):
    path = tmp_path / "d.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in ROWS[:10])
    path.write_bytes(good.encode() + b'{"question": "\xff", "answer": "0"}\n{"question": \n')
    logs: list[str] = []
    splits = load_splits(_cfg(path, on_invalid="skip"), tmp_path, log=logs.append)
    assert len(splits.train) + len(splits.main_eval) == 10
    assert splits.skipped == {"bytes that are not UTF-8": 1, "not valid JSON": 1}
    assert any("d.jsonl:12: not valid JSON" in line for line in logs)
    assert path.read_bytes().endswith(b'{"question": \n')  # the user's file is left as it was


def test_empty_unknown_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_splits(_cfg(tmp_path / "empty.jsonl"), tmp_path)
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match=r"unknown format '.txt'"):
        load_splits(_cfg(tmp_path / "d.txt"), tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        _cfg(tmp_path / "nope.jsonl")


def test_on_invalid_skip_counts_and_names_the_reason(tmp_path):
    rows = ROWS + [{"answer": "1"}, {"question": "", "answer": "1"}]
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    with pytest.raises(DataError, match=r"record 40: missing prompt field 'question'"):
        load_splits(_cfg(path), tmp_path)
    logs: list[str] = []
    splits = load_splits(_cfg(path, on_invalid="skip"), tmp_path, log=logs.append)
    assert sum(splits.skipped.values()) == 2 and len(splits.train) + len(splits.main_eval) == 40
    assert any("skipped 2 invalid records" in line for line in logs)


def test_template_and_sft_pairs():
    cfg = DataConfig(prompt_field="question", completion_field="answer", template="Q: {question} ({answer_hint})=")
    ex = Example("12-13", "-1", {"answer": "-1", "answer_hint": "small"})
    assert format_prompt(ex, cfg) == "Q: 12-13 (small)="
    assert sft_pairs([ex], cfg) == [("Q: 12-13 (small)=", "-1")]
    with pytest.raises(DataError, match="no completion for SFT"):
        sft_pairs([Example("1-1", None, {})], cfg)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_matches_the_tokenizers_own_output(tmp_path):
    from learner.bootstrap import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "12-13?"},
                                             {"role": "assistant", "content": "-1"}], "answer": "-1"}) + "\n"
                    + json.dumps({"messages": "5-2?", "answer": "3"}) + "\n")
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"messages": "9-9?", "answer": "0"}) + "\n")
    cfg = DataConfig(train=str(train), eval=[str(path)], prompt_field="messages", chat_template=True,
                     system_prompt="Be brief.")
    rows = [e for e in load_splits(cfg, tmp_path).main_eval]
    assert rows[0].completion == "-1"  # the final assistant turn is the SFT target, not part of the prompt
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12-13?"}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert format_prompt(rows[0], cfg, tok) == expected
    assert expected == "<|system|>Be brief.<|end|><|user|>12-13?<|end|><|assistant|>"
    assert format_prompt(rows[1], cfg, tok) == "<|system|>Be brief.<|end|><|user|>5-2?<|end|><|assistant|>"
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        format_prompt(rows[0], cfg, tok)


def test_split_by_prompt_needs_two_prompts():
    with pytest.raises(DataError, match="too few"):
        split_by_prompt([Example("a", "b", {})] * 3, 0.5, 0)
