import pytest

from reward_service.records import RewardRequest
from reward_service.rules import RULES, exact_match, get_rule, length_penalty, well_formed


def req(response: str, **meta: str) -> RewardRequest:
    return RewardRequest("23+58=", response, dict(meta))


def test_exact_match_uses_task_rule():
    assert exact_match(req("81", answer="81")) == 1.0
    assert exact_match(req(" 81\n", answer="81")) == 1.0  # is_correct strips whitespace
    assert exact_match(req("82", answer="81")) == 0.0
    assert exact_match(req("81 apples", answer="81")) == 0.0


def test_exact_match_needs_answer():
    with pytest.raises(ValueError, match="metadata\\['answer'\\]"):
        exact_match(req("81"))


def test_format():
    assert well_formed(req("81")) == 1.0
    assert well_formed(req(" -7 ")) == 1.0
    assert well_formed(req("8 1")) == 0.0
    assert well_formed(req("eighty")) == 0.0


def test_length_penalty():
    assert length_penalty(req("81", answer="81")) == 0.0
    assert length_penalty(req("813", answer="81")) == pytest.approx(-0.5)
    assert length_penalty(req("81333333", answer="81")) == -1.0  # capped
    assert length_penalty(req("x" * 12)) == pytest.approx(-0.5)  # default budget 8
    assert length_penalty(req("xxxx", max_chars="2")) == -1.0


def test_registry_and_unknown_name():
    assert set(RULES) == {"exact_match", "format", "length_penalty"}
    assert get_rule("format") is well_formed
    with pytest.raises(ValueError, match=r"unknown rule 'nope'; valid rules: \['exact_match', 'format', "):
        get_rule("nope")
