"""The loop benchmark's figures: the interleaved stretches (``benchmarks/interleaved.py``) against hand-computed
values, the table's limits per streaming loop, and its loop names (``benchmarks/bench_loop.py``)."""

import pytest

from benchmarks.interleaved import interleaved_figures


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


def test_table_reports_each_streaming_loop_against_its_limit():
    from benchmarks.bench_loop import DEFAULT, STREAMING, STREAMING_S2, table

    def loop(step):
        return {"steps": 100, "step_s": step, "learner_s": 0.2, "wait_s": 0.01, "swap_s": 0.001, "staleness": 1}

    stretch = {"steps": 5, "step_s": 0.25, "limit_s": 0.2, "of_limit": 0.8, "seconds": 1.25, "limit_seconds": 1.0}
    inter = {"freezes": [{}, {}], "stretches": [stretch], "of_limit_median": 0.8, "of_limit_time": 0.8,
             "generation_s": 0.2, "learner_s": 0.18, "step_s": 0.25, "kept": [(0.5, 0.5)]}
    bare = {"engine_s": 0.2, "relay_actor_s": 0.2, "learner_s": 0.18, "hf_generate_s": 0.2}
    results = {"bare": {"1": bare, "2": bare}, "two_engines": {"engines_s": 0.1, "half_s": [0.1, 0.1]},
               "loops": {DEFAULT: loop(0.3), STREAMING: loop(0.25), STREAMING_S2: loop(0.2)},
               "interleaved": {STREAMING: inter, STREAMING_S2: inter | {"of_limit_median": 0.95}}}
    md = table(results)
    # limit: max(0.2, 0.18) = 0.2 s; 0.2 / 0.25 = 80% for staleness 1, 0.2 / 0.2 = 100% for staleness 2
    assert results["limits"]["streaming_of_limit"] == pytest.approx(0.8)
    assert results["limits"]["streaming_s2_of_limit"] == pytest.approx(1.0)
    assert results["limits"]["speedup_s2"] == pytest.approx(1.5)
    assert "**80%** of its limit" in md and "**95%** of its limit" in md
    assert "1.25x staleness 1's; **100%** of the limit measured before the streaming loops (0.200 s)" in md
    # measured again right after the staleness-1 loop, i.e. right before staleness 2: that is its limit
    results["bare_after"] = {"1": bare | {"relay_actor_s": 0.25}}
    md = table(results)
    assert results["limits"]["streaming_s2_of_limit"] == pytest.approx(0.25 / 0.2)
    assert "of the limit measured right before it (0.250 s)" in md
    # results written before there was one interleaved run per streaming loop
    assert "**80%** of its limit" in table(results | {"interleaved": inter})


def test_an_unknown_loop_name_lists_the_known_ones():
    from benchmarks.bench_loop import _loop_names

    with pytest.raises(SystemExit, match="streaming 1\\+1 s2"):
        _loop_names("streaming 1+1,streaming 3+3")
