"""The pure verifiers behind the rule rewards, against hand-written cases (no Ray, no Serve)."""

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reward_service.verifiers import (
    extract_boxed,
    extract_final_answer,
    extract_gold_answer,
    extract_hash_answer,
    extract_last_number,
    matches_format,
    math_equivalent,
    numbers_equal,
    overlong_penalty,
    tags_regex,
)


def math_score(response: str, answer: str) -> bool:
    pred = extract_final_answer(response)
    return pred is not None and math_equivalent(pred, extract_gold_answer(answer))


GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"

# (response, reference answer, expected): what math-verify 0.9 really does, checked case by case.
MATH_CASES = [
    # boxed, nested braces, the last box wins
    pytest.param(r"The answer is $\boxed{72}$.", "72", True, id="boxed"),
    pytest.param(r"so $\boxed{\frac{1}{2}}$", "0.5", True, id="nested-boxed-frac-vs-decimal"),
    pytest.param(r"\boxed{\dfrac{3}{4}}", "3/4", True, id="dfrac-vs-slash"),
    pytest.param(r"\boxed{-\frac{1}{2}}", "-0.5", True, id="negative-frac"),
    pytest.param(r"first \boxed{3}, then \boxed{4}", "4", True, id="last-box-wins"),
    pytest.param(r"\boxed{4} and then more text with 7", "4", True, id="box-beats-last-number"),
    pytest.param(r"\boxed{}", "72", False, id="empty-box"),
    # GSM8K: '#### n' in the response and/or the reference
    pytest.param("48 + 24 = 72 clips.\n#### 72", GSM8K_GOLD, True, id="hash-vs-gsm8k-gold"),
    pytest.param("So she sold 72 clips.", GSM8K_GOLD, True, id="last-number-vs-gsm8k-gold"),
    pytest.param("So she sold 71 clips.", GSM8K_GOLD, False, id="wrong-vs-gsm8k-gold"),
    pytest.param("#### 1,000", "1000", True, id="hash-with-commas"),
    # last number: negatives, decimals, fractions, thousands commas
    pytest.param("x = -3", "-3", True, id="negative"),
    pytest.param("x = 3", "-3", False, id="sign-matters"),
    pytest.param("10-3=7", "7", True, id="subtraction-is-not-a-sign"),
    pytest.param("The result is -0.5", "-1/2", True, id="negative-decimal-vs-fraction"),
    pytest.param("0.5", r"\frac{1}{2}", True, id="decimal-vs-latex-frac"),
    pytest.param("answer: .5", "1/2", True, id="leading-dot-decimal"),
    pytest.param("72.0", "72", True, id="trailing-zero"),
    pytest.param("6/8", "3/4", True, id="unreduced-fraction"),
    pytest.param("The total is 1,000 apples", "1000", True, id="commas-in-response"),
    pytest.param("1000", "1,000", True, id="commas-in-answer"),
    pytest.param("It is 1,234,567.", "1234567", True, id="two-comma-groups"),
    pytest.param(r"\boxed{1,000}", "1000", True, id="commas-in-box"),
    pytest.param(r"\boxed{1,2}", "12", False, id="box-1,2-is-a-set"),
    # percentages: math-verify reads 50\% as 50/100 and accepts it against both 50 and 0.5
    pytest.param(r"\boxed{50\%}", "50", True, id="percent-vs-number"),
    pytest.param(r"\boxed{50\%}", "0.5", True, id="percent-vs-fraction"),
    pytest.param("It rose by 50%.", "50", True, id="percent-sign-dropped-by-last-number"),
    # LaTeX expressions
    pytest.param(r"\boxed{\sqrt{2}}", r"\sqrt{2}", True, id="sqrt"),
    pytest.param(r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True, id="2sqrt2-vs-sqrt8"),
    pytest.param(r"\boxed{\sqrt{2}}", "1.414", False, id="sqrt-vs-short-decimal"),
    pytest.param(r"\boxed{\frac{\pi}{2}}", r"\frac{\pi}{2}", True, id="pi-over-2"),
    pytest.param(r"\boxed{2\pi}", r"\pi", False, id="2pi-vs-pi"),
    pytest.param(r"\boxed{x^2+2x+1}", "(x+1)^2", True, id="expanded-polynomial"),
    pytest.param(r"\boxed{10^{3}}", "1000", True, id="power"),
    pytest.param(r"\boxed{\{1,2\}}", r"\{2,1\}", True, id="set-order"),
    pytest.param(r"\boxed{x=5}", "5", True, id="assignment-vs-value"),
    # math-verify compares floats rounded to 6 decimals
    pytest.param("0.333333", r"\frac{1}{3}", True, id="six-decimals-of-a-third"),
    pytest.param("0.33", r"\frac{1}{3}", False, id="two-decimals-of-a-third"),
    pytest.param("0.5000001", "0.5", True, id="rounded-at-6-decimals"),
    # units and text around the answer
    pytest.param("The answer is 72 dollars.", "72", True, id="text-around"),
    pytest.param(r"\boxed{72\text{ dollars}}", "72", True, id="text-unit-in-box"),
    pytest.param(r"\boxed{\$72}", "72", True, id="dollar-sign-in-box"),
    pytest.param(r"\boxed{\text{(C)}}", r"\text{(C)}", True, id="choice-letter"),
    pytest.param(r"\boxed{C}", "D", False, id="wrong-choice-letter"),
    # wrong, none, empty
    pytest.param("73", "72", False, id="wrong"),
    pytest.param("I don't know.", "72", False, id="no-number"),
    pytest.param("", "72", False, id="empty-response"),
    # answers too large to hand to sympy are compared as strings
    pytest.param(r"\boxed{9^{9^{9}}}", "5", False, id="power-tower-vs-number"),
    pytest.param(r"\boxed{9^{9^{9}}}", "9^{9^{9}}", True, id="power-tower-same-string"),
]


@pytest.mark.parametrize(("response", "answer", "expected"), MATH_CASES)
def test_math_cases(response, answer, expected):
    assert math_score(response, answer) is expected


def test_math_cases_give_the_same_verdicts_outside_the_main_thread():
    """Ray Serve runs rules off the main thread, where math-verify's signal.alarm timeout would raise."""
    cases = [(p.values[0], p.values[1]) for p in MATH_CASES]
    verdicts = {}
    thread = threading.Thread(target=lambda: verdicts.update(got=[math_score(r, a) for r, a in cases]))
    thread.start()
    thread.join()
    assert verdicts["got"] == [p.values[2] for p in MATH_CASES]


def test_power_tower_is_refused_quickly():
    start = time.perf_counter()
    assert not math_equivalent("9^{9^{9^{9}}}", "1")
    assert not math_equivalent("1000000!", "1")
    assert time.perf_counter() - start < 2.0


def test_numeric_fallback_when_math_verify_cannot_parse(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "parse", lambda *args, **kwargs: [])
    assert math_equivalent("0.75", r"\frac{3}{4}")
    assert math_equivalent("1,000", "1000")
    assert not math_equivalent("0.75", "1")
    assert math_equivalent("C", " C ")  # neither is a number: stripped strings
    assert not math_equivalent("C", "D")


def test_numbers_equal():
    assert numbers_equal("0.75", r"\frac{3}{4}")
    assert numbers_equal("-1/2", r"\dfrac{-1}{2}")
    assert numbers_equal("1,234,567", "1234567")
    assert numbers_equal(r"\$72", "72")
    assert not numbers_equal("1/0", "1/0")
    assert not numbers_equal("x", "x")


def test_extract_boxed():
    assert extract_boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{ {a}{b} } ") == "{a}{b}"
    assert extract_boxed(r"\fbox{3}") == "3"
    assert extract_boxed(r"\boxed{1} then \boxed{2") == "1"  # the cut-off box is skipped
    assert extract_boxed(r"\boxed{2") is None
    assert extract_boxed("72") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5 apples and 7 pears", "7"),
        ("it is -12.", "-12"),
        ("x-5", "5"),
        ("(3)-2", "2"),
        ("$1,250.50", "1250.50"),
        ("3/4 of it", "3/4"),
        ("1,0000", "0000"),  # not a thousands group: read as 1 then 0000
        ("version 2", "2"),
        ("nothing", None),
        ("", None),
    ],
)
def test_extract_last_number(text, expected):
    assert extract_last_number(text) == expected


def test_extract_hash_answer_and_gold():
    assert extract_hash_answer("so\n#### 1,072\nthanks 5") == "1072"
    assert extract_hash_answer("#### 3 #### 4") == "4"
    assert extract_hash_answer("#### none") is None
    assert extract_gold_answer(GSM8K_GOLD) == "72"
    assert extract_gold_answer(r"so \boxed{\frac{1}{2}}. #### 3") == r"\frac{1}{2}"
    assert extract_gold_answer(r"  2\sqrt{2} ") == r"2\sqrt{2}"


# (length, max_tokens, buffer, factor, expected) hand-computed from DAPO Eq. 13
OVERLONG_CASES = [
    (0, 100, 20, 1.0, 0.0),
    (79, 100, 20, 1.0, 0.0),
    (80, 100, 20, 1.0, 0.0),  # L = L_max - buffer: last unpunished length
    (81, 100, 20, 1.0, -0.05),
    (90, 100, 20, 1.0, -0.5),
    (99, 100, 20, 1.0, -0.95),
    (100, 100, 20, 1.0, -1.0),  # L = L_max
    (101, 100, 20, 1.0, -1.0),
    (10_000, 100, 20, 1.0, -1.0),
    (90, 100, 20, 0.5, -0.25),
    (101, 100, 20, 0.5, -0.5),
    (100, 100, 0, 1.0, 0.0),  # no buffer: a hard cut
    (101, 100, 0, 1.0, -1.0),
    (50, 100, 100, 1.0, -0.5),  # buffer = max_tokens: punished from the first token
    (16384, 20480, 4096, 1.0, 0.0),  # DAPO's setting
    (18432, 20480, 4096, 1.0, -0.5),
]


@pytest.mark.parametrize(("length", "max_tokens", "buffer", "factor", "expected"), OVERLONG_CASES)
def test_overlong_penalty(length, max_tokens, buffer, factor, expected):
    assert overlong_penalty(length, max_tokens, buffer, factor) == pytest.approx(expected)


@given(st.integers(0, 300), st.integers(1, 200), st.data())
def test_overlong_penalty_is_a_clipped_ramp(length, max_tokens, data):
    """A second formulation: -clip((L - (L_max - buffer)) / buffer, 0, 1)."""
    buffer = data.draw(st.integers(1, max_tokens))
    ramp = (length - (max_tokens - buffer)) / buffer
    assert overlong_penalty(length, max_tokens, buffer) == pytest.approx(-min(1.0, max(0.0, ramp)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((-1, 100, 20), "length"),
        ((10, 0, 0), "max_tokens > 0"),
        ((10, 100, 101), "buffer <= max_tokens"),
        ((10, 100.0, 20), "max_tokens must be a non-negative int"),
        ((10, 100, 20, -1.0), "factor"),
    ],
)
def test_overlong_penalty_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(*args)


THINK_ANSWER = ["think", "answer"]

FORMAT_CASES = [
    # default: a single integer, as the old rule
    pytest.param("81", {}, True, id="integer"),
    pytest.param(" -7 \n", {}, True, id="integer-with-whitespace"),
    pytest.param("8 1", {}, False, id="two-integers"),
    pytest.param("eighty", {}, False, id="word"),
    pytest.param("8.5", {}, False, id="decimal"),
    # pattern: fullmatch of the stripped text, DOTALL
    pytest.param("  Answer: 42 ", {"pattern": r"Answer: \d+"}, True, id="pattern"),
    pytest.param("Answer: 42 because", {"pattern": r"Answer: \d+"}, False, id="pattern-must-fullmatch"),
    pytest.param("line1\nline2", {"pattern": r"line1.line2"}, True, id="pattern-dotall"),
    # tags: each once, in order, only whitespace around
    pytest.param("<think>2+2</think><answer>4</answer>", {"tags": THINK_ANSWER}, True, id="tags"),
    pytest.param("\n<think>a\nb</think>\n\n<answer>4</answer>\n", {"tags": THINK_ANSWER}, True, id="tags-whitespace"),
    pytest.param("<think></think><answer></answer>", {"tags": THINK_ANSWER}, True, id="tags-empty-content"),
    pytest.param("<answer>4</answer><think>2+2</think>", {"tags": THINK_ANSWER}, False, id="tags-wrong-order"),
    pytest.param("<think>2+2</think>", {"tags": THINK_ANSWER}, False, id="tags-missing-answer"),
    pytest.param("<think>2+2</think>4", {"tags": THINK_ANSWER}, False, id="tags-answer-not-tagged"),
    pytest.param(
        "<think>a</think><think>b</think><answer>4</answer>", {"tags": THINK_ANSWER}, False, id="tags-duplicated"
    ),
    pytest.param(
        "<think>a</think><answer>4</answer><answer>5</answer>", {"tags": THINK_ANSWER}, False, id="tags-dup-answer"
    ),
    pytest.param("<think>a<think>b</think><answer>4</answer>", {"tags": THINK_ANSWER}, False, id="tags-nested-open"),
    pytest.param("Sure! <think>a</think><answer>4</answer>", {"tags": THINK_ANSWER}, False, id="text-before-tags"),
    pytest.param("<think>a</think> so <answer>4</answer>", {"tags": THINK_ANSWER}, False, id="text-between-tags"),
    pytest.param("<think>a</think><answer>4</answer> done", {"tags": THINK_ANSWER}, False, id="text-after-tags"),
    pytest.param("<think>a</think><answer>4</answer>", {"tags": ["answer"]}, False, id="untagged-text-with-one-tag"),
    pytest.param("<answer>4</answer>", {"tags": ["answer"]}, True, id="one-tag"),
    # both: both must hold
    pytest.param(
        "<think>a</think><answer>4</answer>",
        {"tags": THINK_ANSWER, "pattern": r".*<answer>\d+</answer>"},
        True,
        id="tags-and-pattern",
    ),
    pytest.param(
        "<think>a</think><answer>four</answer>",
        {"tags": THINK_ANSWER, "pattern": r".*<answer>\d+</answer>"},
        False,
        id="tags-but-not-pattern",
    ),
]


@pytest.mark.parametrize(("text", "params", "expected"), FORMAT_CASES)
def test_matches_format(text, params, expected):
    assert matches_format(text, **params) is expected


@pytest.mark.parametrize(
    ("tags", "match"),
    [([], "non-empty"), ("think", "non-empty list"), (["a b"], "not tag names"), (["x", "x"], "repeat")],
)
def test_tags_regex_rejects_bad_tags(tags, match):
    with pytest.raises(ValueError, match=match):
        tags_regex(tags)
