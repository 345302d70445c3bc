"""Pure verifiers behind the rule rewards: strings and ints in, bools and floats out.

``rules.py`` registers thin wrappers over these; other modules may import them directly (the objectives
code reuses ``overlong_penalty``). Importing this module imports only the standard library: math-verify
(and with it sympy) is imported inside ``math_equivalent`` on first use.

Simplifications, on purpose:

- The final answer of a response is found by position only: the last balanced ``\\boxed{...}``, else the first
  number after the last ``####``, else the last number in the text. A bare ``\\sqrt{2}`` without a box is read
  as its last number, 2: a math policy is expected to box LaTeX answers.
- A gold answer is the content of its last ``\\boxed{}``, else the number after its last ``####`` (GSM8K),
  else the whole stripped string; units written as plain words in a gold answer are not removed.
- math-verify bounds its own run time with ``signal.alarm``, which works only in the main thread, and raises
  otherwise. Ray Serve runs user code on another thread, so there we switch its timeout off and instead
  refuse to hand it expressions whose numeric parts exceed ``10**MAX_DIGITS`` (power towers, huge
  factorials), which are what make sympy hang; such answers are compared as strings, in every thread.
"""

from __future__ import annotations

import math as _math
import re
import threading
from fractions import Fraction

MAX_DIGITS = 1000
"""numeric sub-expressions larger than 10**MAX_DIGITS are not given to sympy (see module docstring)"""
MATH_TIMEOUT_S = 5
"""math-verify's per-call timeout when called from the main thread"""

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"  # 1,000,000 or 1000000
_NUMBER = re.compile(rf"(?:(?<![\w)\]])-)?(?:{_INT}(?:\.\d+)?(?:/\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")
_TAG_NAME = re.compile(r"[A-Za-z][\w-]*")
INTEGER_PATTERN = r"-?\d+"
"""the default of ``matches_format``: the stripped response is a single integer"""


# ---------------------------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> str | None:
    """The content of the last balanced ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces included.

    >>> extract_boxed(r"so $\\boxed{\\frac{1}{2}}$.")
    '\\\\frac{1}{2}'
    >>> extract_boxed(r"\\boxed{1} then \\boxed{2")  # the last one is cut off: the last balanced one wins
    '1'
    >>> extract_boxed("72") is None
    True
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[match.end() : i].strip()
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in ``text`` with thousands commas removed: integers, negatives, decimals, fractions.

    A minus counts only where it cannot be subtraction (not right after a letter, digit or bracket).

    >>> extract_last_number("It costs $1,250.50, or -3/4 of that")
    '-3/4'
    >>> extract_last_number("so 10-3=7.")
    '7'
    >>> extract_last_number("no digits") is None
    True
    """
    numbers = _NUMBER.findall(text)
    return _THOUSANDS.sub("", numbers[-1]) if numbers else None


def extract_hash_answer(text: str) -> str | None:
    """The first number after the last ``####`` (GSM8K's answer marker), on the same line.

    >>> extract_hash_answer("48/2 = 24 clips.\\n#### 1,072")
    '1072'
    >>> extract_hash_answer("no marker") is None
    True
    """
    _, marker, tail = text.rpartition("####")
    if not marker:
        return None
    match = _NUMBER.search(tail.split("\n", 1)[0])
    return _THOUSANDS.sub("", match.group()) if match else None


def extract_final_answer(text: str) -> str | None:
    """A response's final answer: last ``\\boxed{}``, else the number after ``####``, else the last number.

    >>> extract_final_answer(r"... = \\boxed{2\\sqrt{2}}")
    '2\\\\sqrt{2}'
    >>> extract_final_answer("So she has 5 apples.")
    '5'
    """
    for extract in (extract_boxed, extract_hash_answer, extract_last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def extract_gold_answer(answer: str) -> str:
    """A reference answer's final answer: last ``\\boxed{}``, else the number after ``####``, else all of it.

    >>> extract_gold_answer("Natalia sold 48/2 = 24 clips in May.\\n#### 72")
    '72'
    >>> extract_gold_answer(r" \\frac{1}{2} ")
    '\\\\frac{1}{2}'
    """
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    hashed = extract_hash_answer(answer)
    return hashed if hashed is not None else answer.strip()


# ---------------------------------------------------------------------------------------------- equivalence


def math_equivalent(pred: str, gold: str) -> bool:
    """Whether two extracted answers are mathematically equal, by math-verify (``parse`` then ``verify``).

    Both are read as LaTeX math (wrapped in ``$...$``) or plain expressions. If math-verify cannot parse
    one of them, they are compared as exact numbers (``numbers_equal``), then as stripped strings.

    >>> math_equivalent("0.5", r"\\frac{1}{2}"), math_equivalent(r"2\\sqrt{2}", r"\\sqrt{8}")
    (True, True)
    >>> math_equivalent("-3", "3")
    False
    """
    from math_verify import parse, verify

    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_TIMEOUT_S if in_main else None  # signal.alarm raises outside the main thread
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
    pred_parsed = parse(f"${pred}$", parsing_timeout=timeout)
    gold_exprs, pred_exprs = _sympy_only(gold_parsed), _sympy_only(pred_parsed)
    if not gold_exprs or not pred_exprs:
        return numbers_equal(pred, gold) or pred.strip() == gold.strip()
    if not all(_small(e) for e in gold_exprs + pred_exprs):  # in every thread, so rewards do not depend on it
        return pred.strip() == gold.strip()
    return verify(gold_parsed, pred_parsed, timeout_seconds=timeout)  # order matters: gold first


def numbers_equal(pred: str, gold: str) -> bool:
    """Exact equality of two plain numbers (``1,000``, ``-0.5``, ``3/4``, ``\\frac{3}{4}``), without sympy.

    >>> numbers_equal("0.75", r"\\frac{3}{4}"), numbers_equal("1,000", "1000"), numbers_equal("x", "x")
    (True, True, False)
    """
    a, b = _as_fraction(pred), _as_fraction(gold)
    return a is not None and a == b


def _as_fraction(text: str) -> Fraction | None:
    text = _LATEX_FRAC.sub(r"\1/\2", _THOUSANDS.sub("", text.strip().strip("$").replace("\\$", "")))
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _sympy_only(parsed: list) -> list:
    """math-verify's ``parse`` returns sympy objects and, as a fallback, the matched strings: keep the former."""
    return [p for p in parsed if not isinstance(p, str)]


def _small(expr) -> bool:
    """Whether ``expr`` is safe to hand to sympy: every part at most about ``10**MAX_DIGITS`` in size."""
    try:
        return _log10_bound(expr) <= MAX_DIGITS
    except (AttributeError, TypeError, ValueError, OverflowError, RecursionError):
        return False


def _log10_bound(node) -> float:
    """An upper bound on log10 of the magnitude of ``node`` and of each of its parts, from the tree alone.

    Nothing is evaluated, so a power tower costs no more to bound than to read. Symbols count as 1.
    """
    import sympy

    if isinstance(node, sympy.Rational):  # Integer included
        return _math.log10(max(1, abs(node.p), node.q))
    if isinstance(node, sympy.Float):
        return _math.log10(max(1.0, abs(float(node))))
    args = list(node) if isinstance(node, sympy.MatrixBase) else node.args
    parts = [_log10_bound(arg) for arg in args if isinstance(arg, (sympy.Basic, sympy.MatrixBase))]
    if isinstance(node, sympy.Pow):  # |b**e| <= 10 ** (|e| * log10|b|), |e| <= 10 ** bound(e)
        base, exponent = parts
        return _math.inf if exponent > 300 else 10.0**exponent * max(base, 0.5)
    if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma, sympy.exp)):
        n = 10.0 ** parts[0] if parts[0] <= 300 else _math.inf
        return n * max(1.0, _math.log10(n))  # n! <= n**n, e**n < 10**n
    if isinstance(node, sympy.Mul):
        return sum(parts)
    return max(parts, default=0.0) + _math.log10(len(parts) + 1)  # sums, other functions, containers


# ---------------------------------------------------------------------------------------------- format


def matches_format(text: str, pattern: str | None = None, tags: list[str] | None = None) -> bool:
    """Whether ``text`` has the required shape.

    ``pattern`` must fullmatch the stripped text (``re.DOTALL``); ``tags`` (e.g. ``["think", "answer"]``) must
    each appear exactly once, as ``<tag>...</tag>`` blocks in that order, with only whitespace around them.
    With neither, the stripped text must be a single integer (``INTEGER_PATTERN``); with both, both must hold.

    >>> matches_format(" -7 "), matches_format("8 1")
    (True, False)
    >>> matches_format("<think>2+2</think>\\n<answer>4</answer>", tags=["think", "answer"])
    True
    >>> matches_format("<answer>4</answer><think>2+2</think>", tags=["think", "answer"])
    False
    >>> matches_format("Answer: 42", pattern=r"Answer: \\d+")
    True
    """
    if pattern is None and tags is None:
        pattern = INTEGER_PATTERN
    if pattern is not None and not re.fullmatch(pattern, text.strip(), re.DOTALL):
        return False
    if tags is not None:
        if not re.fullmatch(tags_regex(tags), text, re.DOTALL):
            return False
        if any(text.count(f"<{t}>") != 1 or text.count(f"</{t}>") != 1 for t in tags):
            return False
    return True


def tags_regex(tags: list[str]) -> str:
    """The regex of ``<t1>...</t1> <t2>...</t2>`` with only whitespace around; ValueError on a bad tag list.

    >>> tags_regex(["think", "answer"])
    '\\\\s*<think>.*?</think>\\\\s*<answer>.*?</answer>\\\\s*'
    """
    if isinstance(tags, str) or not tags:
        raise ValueError(f"tags must be a non-empty list of tag names, got {tags!r}")
    bad = [t for t in tags if not isinstance(t, str) or not _TAG_NAME.fullmatch(t)]
    if bad:
        raise ValueError(f"tags {bad!r} are not tag names (a letter, then letters, digits, '_' or '-')")
    if len(set(tags)) != len(tags):
        raise ValueError(f"tags {tags!r} repeat a name")
    return r"\s*" + r"\s*".join(f"<{t}>.*?</{t}>" for t in tags) + r"\s*"


# ---------------------------------------------------------------------------------------------- length


def overlong_penalty(length: int, max_tokens: int, buffer: int, factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, in [-factor, 0].

    Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", Eq. 13
    (https://arxiv.org/abs/2503.14476), with L = ``length``, L_max = ``max_tokens``, L_cache = ``buffer``:
    0 while L <= L_max - L_cache, then falling linearly to -1 at L = L_max, and -1 beyond; times ``factor``.
    ``buffer = 0`` is a hard cut at ``max_tokens``.

    >>> overlong_penalty(80, max_tokens=100, buffer=20), overlong_penalty(90, 100, 20), overlong_penalty(101, 100, 20)
    (0.0, -0.5, -1.0)
    >>> overlong_penalty(95, 100, 20, factor=0.5)
    -0.375
    """
    for name, value in (("length", length), ("max_tokens", max_tokens), ("buffer", buffer)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if max_tokens == 0 or buffer > max_tokens:
        raise ValueError(f"need 0 <= buffer <= max_tokens and max_tokens > 0, got {buffer=} {max_tokens=}")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor < 0:
        raise ValueError(f"factor must be a non-negative number, got {factor!r}")
    expected = max_tokens - buffer  # L_max - L_cache
    if length <= expected:
        return 0.0
    if length <= max_tokens:
        return factor * (expected - length) / buffer
    return -1.0 * factor
