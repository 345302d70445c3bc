import math

import pytest

from reward_service.combine import RunningNorm, clip, combine, finish, validate_request
from reward_service.records import RewardRequest, SourceScore

REQ = RewardRequest("1+1=", "2", {"answer": "2"})


def test_validate_accepts_records_and_dicts():
    assert validate_request(REQ) == REQ
    assert validate_request({"prompt": "1+1=", "response": "2"}) == RewardRequest("1+1=", "2", {})
    assert validate_request({"prompt": "p", "response": "r", "metadata": {"answer": "2"}}).metadata == {"answer": "2"}
    # an empty response is a legitimate (wrong) policy answer: it is scored, not rejected
    assert validate_request({"prompt": "p", "response": ""}) == RewardRequest("p", "", {})


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p"}, "missing field(s) ['response']"),
    ({"prompt": "p", "response": 3}, "response must be a string, got int"),
    ({"prompt": "", "response": "r"}, "prompt is empty"),
    ({"prompt": "p", "response": "r", "metadata": {"answer": 2}}, "metadata must be a dict of strings"),
    ({"prompt": "p", "response": "r", "extra": 1}, "unknown field(s) ['extra']"),
    (RewardRequest("p", None, {}), "response must be a string, got NoneType"),
    ("just a string", "expected a RewardRequest or a dict, got str"),
])
def test_validate_rejects_with_clear_message(bad, message):
    out = validate_request(bad)
    assert isinstance(out, str) and out.startswith("bad request") and message in out


def test_combine_weights_and_components():
    scores = {"em": SourceScore(1.0), "rm": SourceScore(0.4), "ens": SourceScore(2.0, {"mean": 2.5, "std": 1.0})}
    reward, comps, err, non_finite = combine(REQ, scores, {"em": 1.0, "rm": 0.5, "ens": -0.25})
    assert reward == pytest.approx(1.0 + 0.2 - 0.5)
    assert comps == {"em": 1.0, "rm": 0.4, "ens": 2.0, "ens/mean": 2.5, "ens/std": 1.0}
    assert err is None and not non_finite


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_combine_excludes_non_finite(value):
    reward, comps, err, non_finite = combine(REQ, {"em": SourceScore(1.0), "rm": SourceScore(value)},
                                             {"em": 1.0, "rm": 1.0})
    assert reward is None and non_finite
    assert "non-finite" in err and "rm=" in err and "'1+1='" in err  # names the source and quotes the sample
    assert comps == {"em": 1.0}


def test_combine_source_error():
    reward, _, err, non_finite = combine(REQ, {"em": SourceScore(None, error="needs answer")}, {"em": 1.0})
    assert reward is None and not non_finite and "source 'em': needs answer" in err


def test_running_norm_matches_batch_statistics():
    norm = RunningNorm()
    xs = [1.0, 2.0, 4.0, 7.0]
    norm.update(xs[:1])
    norm.update(xs[1:])
    mean = sum(xs) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
    assert (norm.mean, norm.std) == (pytest.approx(mean), pytest.approx(std))
    assert norm.apply(7.0) == pytest.approx((7.0 - mean) / std)


def test_finish_normalises_then_clips_and_keeps_exclusions():
    rows = [(1.0, {}, None), (3.0, {}, None), (None, {}, "excluded")]
    out = finish(rows, RunningNorm(), (-0.5, 2.0))
    assert [r.reward for r in out] == [pytest.approx(-0.5), pytest.approx(1.0), None]  # (x-2)/1 clipped
    assert out[2].error == "excluded"
    assert clip(5.0, None) == 5.0 and clip(5.0, (0.0, 1.0)) == 1.0
