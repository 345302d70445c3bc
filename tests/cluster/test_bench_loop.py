"""The loop benchmark's interleaved figures (``benchmarks/bench_loop.py``): hand-computed stretches."""

import pytest

from benchmarks.bench_loop import interleaved_figures


def _rows(ends: list[float], step: float) -> list[dict]:
    return [{"step": 11 + i, "time": end, "system/step_seconds": step} for i, end in enumerate(ends)]


def test_each_stretch_against_the_mean_of_the_limits_around_it():
    freezes = [{"start": 10.0, "end": 11.0, "generation_s": 0.20, "learner_s": 0.10},
               {"start": 20.0, "end": 21.0, "generation_s": 0.15, "learner_s": 0.30},
               {"start": 30.0, "end": 31.0, "generation_s": 0.20, "learner_s": 0.20}]
    # first stretch: steps of 0.5 s ending 12.0 .. 19.5, but the one ending 11.5 (started 11.0, inside the
    # guard) and one overlapping the second freeze (ending 20.4) are left out
    rows = _rows([11.5, 12.0, 13.0, 14.0, 15.0, 20.4], 0.5) + _rows([22.0, 23.0, 24.0, 25.0], 0.25)
    rows.append({"step": 3, "time": 13.5, "system/step_seconds": 0.1})  # a warm-up step: left out
    figures = interleaved_figures(rows, freezes)
    first, second = figures["stretches"]
    assert first["steps"] == 4 and first["step_s"] == 0.5
    assert first["limit_s"] == pytest.approx((0.20 + 0.30) / 2)
    assert first["of_limit"] == pytest.approx(0.25 / 0.5)
    assert second["steps"] == 4 and second["limit_s"] == pytest.approx((0.30 + 0.20) / 2)
    assert second["of_limit"] == pytest.approx(1.0)
    assert figures["of_limit_median"] == pytest.approx(0.75)
    # over the time: (4 x 0.25 + 4 x 0.25) allowed against 4 x 0.5 + 4 x 0.25 taken
    assert figures["of_limit_time"] == pytest.approx(2.0 / 3.0)


def test_no_stretch_with_three_steps_is_an_error_that_says_what_to_do():
    freezes = [{"start": 10.0, "end": 11.0, "generation_s": 0.2, "learner_s": 0.1},
               {"start": 20.0, "end": 21.0, "generation_s": 0.2, "learner_s": 0.1}]
    with pytest.raises(RuntimeError, match="run it longer"):
        interleaved_figures(_rows([12.0, 13.0], 0.5), freezes)
