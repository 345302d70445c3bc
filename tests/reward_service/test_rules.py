"""The rule registry and each rule through a RewardRequest (the verifiers' cases are in test_verifiers.py)."""

import inspect
import subprocess
import sys

import pytest

from reward_service.records import RewardRequest
from reward_service.rules import (
    REQUIRED,
    RULES,
    check_params,
    exact_match,
    get_rule,
    integer,
    length_penalty,
    math_answer,
    overlong,
    well_formed,
)


def req(response: str, **meta: str) -> RewardRequest:
    return RewardRequest("23+58=", response, dict(meta))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_docs():
    assert set(RULES) == {"exact_match", "math", "format", "integer", "length_penalty", "overlong"}
    assert get_rule("format").fn is well_formed
    assert all(rule.doc and "\n" not in rule.doc for rule in RULES.values())


def test_unknown_rule_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'nope'; valid rules: \['exact_match', 'format', "):
        get_rule("nope")
    with pytest.raises(ValueError, match="unknown rule 'nope'"):
        check_params("nope", {})


@pytest.mark.parametrize("name", sorted(RULES))
def test_registered_params_match_the_function_signature(name):
    """The registry is where the config validator reads params; the function must accept exactly those."""
    rule = RULES[name]
    params = list(inspect.signature(rule.fn).parameters.values())[1:]  # after req
    assert {p.name: (REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params} == rule.params


def test_check_params_merges_defaults():
    assert check_params("exact_match", {}) == {}
    assert check_params("format", {}) == {"pattern": None, "tags": None}
    assert check_params("format", {"tags": ["think", "answer"]}) == {"pattern": None, "tags": ["think", "answer"]}
    merged = check_params("overlong", {"max_tokens": 4096, "overlong_buffer": 1024})
    assert merged == {"max_tokens": 4096, "overlong_buffer": 1024, "penalty_factor": 1.0}
    assert RULES["overlong"].params["max_tokens"] is REQUIRED  # defaults are not mutated


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("format", {"patern": "x"}, r"rule 'format' has no param 'patern'; allowed params: \['pattern', 'tags'\]"),
        ("exact_match", {"strict": True}, "rule 'exact_match' has no param 'strict'; allowed params: none"),
        ("overlong", {}, "rule 'overlong' needs param 'max_tokens'"),
        ("overlong", {"max_tokens": 100, "overlong_buffer": 200}, "rule 'overlong': .*buffer <= max_tokens"),
        ("overlong", {"max_tokens": "4096"}, "max_tokens must be a non-negative int"),
        ("overlong", {"max_tokens": 100, "penalty_factor": -1}, "factor must be a non-negative number"),
        ("format", {"pattern": "("}, "rule 'format': param 'pattern' is not a valid regex"),
        ("format", {"pattern": 3}, "param 'pattern' must be a regex string"),
        ("format", {"tags": "think"}, "tags must be a non-empty list"),
        ("format", {"tags": ["<think>"]}, "not tag names"),
    ],
)
def test_check_params_rejects(name, params, match):
    with pytest.raises(ValueError, match=match):
        check_params(name, params)


def test_importing_rules_imports_no_heavy_library():
    """The config validator imports this module; math-verify (sympy) loads on the first math score only."""
    code = (
        "import sys, reward_service.rules; "
        "print(sorted(m for m in ('math_verify', 'sympy', 'torch', 'ray', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------------------------------------- rules


def test_exact_match():
    assert exact_match(req("81", answer="81")) == 1.0
    assert exact_match(req(" 81\n", answer="81")) == 1.0  # surrounding whitespace is stripped
    assert exact_match(req("81", answer=" 81 ")) == 1.0
    assert exact_match(req("82", answer="81")) == 0.0
    assert exact_match(req("81 apples", answer="81")) == 0.0


@pytest.mark.parametrize("rule", [exact_match, math_answer])
def test_rules_need_answer(rule):
    with pytest.raises(ValueError, match=r"metadata\['answer'\]"):
        rule(req("81"))


def test_math():
    gsm8k = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
    assert math_answer(req("She sold 48 + 24 = 72 clips.", answer=gsm8k)) == 1.0
    assert math_answer(req(r"So $\boxed{\frac{1}{2}}$.", answer="0.5")) == 1.0
    assert math_answer(req("#### 1,000", answer="1000")) == 1.0
    assert math_answer(req("So 71 clips.", answer=gsm8k)) == 0.0
    assert math_answer(req("no idea", answer="72")) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        math_answer(req("72", answer="  "))


def test_format_default_keeps_the_integer_rule():
    for rule in (well_formed, integer):
        assert rule(req("81")) == 1.0
        assert rule(req(" -7 ")) == 1.0
        assert rule(req("8 1")) == 0.0
        assert rule(req("eighty")) == 0.0


def test_format_with_pattern_and_tags():
    tags = ["think", "answer"]
    assert well_formed(req("<think>2+2</think>\n<answer>4</answer>"), tags=tags) == 1.0
    assert well_formed(req("<answer>4</answer><think>2+2</think>"), tags=tags) == 0.0
    assert well_formed(req("Answer: 42"), pattern=r"Answer: \d+") == 1.0
    assert well_formed(req("42"), pattern=r"Answer: \d+") == 0.0
    params = check_params("format", {"tags": tags})
    assert get_rule("format").fn(req("<think>a</think><answer>4</answer>"), **params) == 1.0


def test_length_penalty():
    assert length_penalty(req("81", answer="81")) == 0.0
    assert length_penalty(req("813", answer="81")) == pytest.approx(-0.5)
    assert length_penalty(req("81333333", answer="81")) == -1.0  # capped
    assert length_penalty(req("x" * 12)) == pytest.approx(-0.5)  # default budget 8
    assert length_penalty(req("xxxx", max_chars="2")) == -1.0
    with pytest.raises(ValueError, match=r"metadata\['max_chars'\] must be an int"):
        length_penalty(req("x", max_chars="lots"))
    with pytest.raises(ValueError, match="positive"):
        length_penalty(req("x", max_chars="0"))


def test_overlong():
    params = check_params("overlong", {"max_tokens": 100, "overlong_buffer": 20, "penalty_factor": 0.5})
    score = get_rule("overlong").fn
    assert score(RewardRequest("p", "r", response_tokens=80), **params) == 0.0
    assert score(RewardRequest("p", "r", response_tokens=90), **params) == pytest.approx(-0.25)
    assert score(RewardRequest("p", "r", response_tokens=500), **params) == pytest.approx(-0.5)
    assert overlong(RewardRequest("p", "r", response_tokens=101), max_tokens=100) == -1.0


def test_overlong_needs_response_tokens():
    with pytest.raises(ValueError, match="response_tokens"):
        overlong(req("81"), max_tokens=100)
    with pytest.raises(ValueError, match="response_tokens"):
        overlong(RewardRequest("p", "r", response_tokens=None), max_tokens=100)
