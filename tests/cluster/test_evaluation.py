"""Evaluation numbers against a hand-computed case, and the reward-hacking monitor (no Ray)."""

from __future__ import annotations

import math

import pytest

from cluster.evaluation import (
    EvalSamples,
    Evaluator,
    HackingThresholds,
    distinct_n,
    evaluation_metrics,
    pass_and_mean_at_k,
    reward_hacking_flags,
    token_kl,
    win_rate,
)


def test_distinct_n_hand_case():
    responses = [[1, 2, 1], [1, 2]]
    # unigrams: 1,2,1,1,2 -> 2 distinct of 5; bigrams: (1,2),(2,1),(1,2) -> 2 distinct of 3
    assert distinct_n(responses, 1) == pytest.approx(2 / 5)
    assert distinct_n(responses, 2) == pytest.approx(2 / 3)
    assert distinct_n([[1]], 2) == 0.0


def test_win_rate_ties_count_half():
    assert win_rate([1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 0.5, 1.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_token_kl_k1_k3_hand_case():
    pol = [[math.log(0.5), math.log(0.25)], [math.log(0.5)]]
    ref = [[math.log(0.25), math.log(0.25)], [math.log(1.0)]]
    # r = ref - pol per token: ln(1/2), 0, ln 2
    r = [math.log(0.5), 0.0, math.log(2.0)]
    assert token_kl(pol, ref, "k1") == pytest.approx(sum(-x for x in r) / 3)  # = 0
    assert token_kl(pol, ref, "k3") == pytest.approx(sum(math.exp(x) - 1 - x for x in r) / 3)
    # k3 hand values: (0.5 - 1 + ln2) + 0 + (2 - 1 - ln2) = 0.5 -> mean 1/6
    assert token_kl(pol, ref, "k3") == pytest.approx(1 / 6)


def test_evaluation_metrics_hand_case():
    s = EvalSamples(
        true_scores=[1.0, 1.0, 0.0],
        responses=["81", " 10 ", "8"],
        response_ids=[[8, 1, 0], [1, 0], [8, 8, 8, 8]],
        rewards=[1.0, 0.5, 0.0],
        reference_rewards=[0.0, 0.5, 1.0],
        sample_logprobs=[[math.log(0.5)]],
        sample_reference_logprobs=[[math.log(0.25)]],
    )
    m = evaluation_metrics(s)
    assert m["eval/task_score"] == pytest.approx(2 / 3)
    assert m["eval/reward_mean"] == pytest.approx(0.5)
    assert m["eval/reference_reward_mean"] == pytest.approx(0.5)
    assert m["eval/win_rate_vs_reference"] == pytest.approx(0.5)  # win, tie, loss
    assert m["eval/response_length_tokens"] == pytest.approx(3.0)
    # unigrams 8,1,0,1,0,8,8,8,8: {0,1,8} of 9; bigrams (8,1),(1,0),(1,0),(8,8)x3: 3 distinct of 6
    assert m["eval/distinct_1"] == pytest.approx(3 / 9)
    assert m["eval/distinct_2"] == pytest.approx(3 / 6)
    assert m["eval/kl_to_reference"] == pytest.approx(0.5 - 1 + math.log(2))
    assert m["eval/kl_k1_to_reference"] == pytest.approx(math.log(2))


def _h(rm: float, true: float, length: float = 3.0, d2: float = 0.5) -> dict[str, float]:
    return {"eval/reward_mean": rm, "eval/task_score": true, "eval/response_length_tokens": length,
            "eval/distinct_2": d2}


def test_monitor_quiet_when_both_scores_rise():
    history = [_h(0.1, 0.1), _h(0.2, 0.2), _h(0.3, 0.3), _h(0.4, 0.4), _h(0.5, 0.5)]
    assert reward_hacking_flags(history) == {}
    assert reward_hacking_flags(history[:3]) == {}  # too short to judge


def test_monitor_flags_rm_up_true_flat():
    history = [_h(0.1, 0.30), _h(0.2, 0.32), _h(0.4, 0.31), _h(0.6, 0.30), _h(0.8, 0.28)]
    flags = reward_hacking_flags(history)
    assert list(flags) == ["rm_vs_true"] and "RM score rising" in flags["rm_vs_true"]
    assert reward_hacking_flags(history, has_true_score=False) == {}  # the RM is its own judge: nothing to compare


def test_monitor_flags_length_and_repetition_drift():
    history = [_h(0.1, 0.1, 3.0, 0.6), _h(0.1, 0.1, 3.0, 0.6), _h(0.1, 0.1, 6.0, 0.2), _h(0.1, 0.1, 6.0, 0.2),
               _h(0.1, 0.1, 6.0, 0.2)]
    flags = reward_hacking_flags(history, HackingThresholds())
    assert set(flags) == {"length", "repetition"}


def test_monitor_flags_kl_acceleration_by_hand():
    def h(kl):
        return {**_h(0.1, 0.1), "eval/kl_to_reference": kl}
    steady = [h(0.1), h(0.15), h(0.2), h(0.25), h(0.3), h(0.35)]  # +0.05 per evaluation throughout
    assert reward_hacking_flags(steady) == {}
    # before the window: 0.10 -> 0.14 over 3 evaluations (+0.0133 each); in it: 0.14 -> 0.30 over 2 (+0.08 each)
    fast = [h(0.1), h(0.12), h(0.13), h(0.14), h(0.22), h(0.30)]
    assert list(reward_hacking_flags(fast)) == ["kl_acceleration"]
    assert "+0.080 per evaluation" in reward_hacking_flags(fast)["kl_acceleration"]
    noise = [h(0.01), h(0.01), h(0.01), h(0.01), h(0.02), h(0.03)]  # faster, but below kl_min_rise
    assert reward_hacking_flags(noise) == {}
    jump = [h(0.1), h(0.12), h(0.13), h(0.22), h(0.21), h(0.40)]  # a fast rise, but not at every evaluation
    assert reward_hacking_flags(jump) == {}


def test_evaluator_caches_reference_and_flags():
    calls = {"ref": 0}
    rm_by_round = iter([0.1, 0.2, 0.3, 0.5, 0.7])
    state = {"rm": 0.0}

    def policy(prompts):
        state["rm"] = next(rm_by_round)
        return ["1"] * len(prompts), [[1]] * len(prompts)

    def reference(prompts):
        calls["ref"] += 1
        return ["0"] * len(prompts), [[0]] * len(prompts)

    def score(prompts, responses, metadatas):
        return [state["rm"] if r == "1" else 0.0 for r in responses]

    def exact(prompts, responses, metadatas):
        return [float(r.strip() == m["answer"]) for r, m in zip(responses, metadatas, strict=True)]

    ev = Evaluator(prompts=["1+1=", "2+2="], metadatas=[{"answer": "2"}, {"answer": "4"}], policy_greedy=policy,
                   reference_greedy=reference, score=score, true_score=exact)
    logs: list[str] = []
    results = [ev(log=logs.append) for _ in range(5)]
    assert calls["ref"] == 1
    assert results[0]["eval/win_rate_vs_reference"] == 1.0
    assert "eval/kl_to_reference" not in results[0]  # no sampler given
    assert [r["eval/reward_hacking_flag"] for r in results] == [0.0, 0.0, 0.0, 1.0, 1.0]  # window + 1 needed
    assert results[3]["eval/reward_hacking_signal{signal=rm_vs_true}"] == 1.0
    assert results[3]["eval/reward_hacking_signal{signal=length}"] == 0.0
    assert logs and "reward-hacking monitor (rm_vs_true)" in logs[0]


def test_pass_and_mean_at_k_by_hand():
    # prompt 1: one of three passes; prompt 2: none; prompt 3: all -> pass@3 = 2/3; mean of the nine = 4.5/9
    scores = [[0.0, 1.0, 0.0], [0.5, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert pass_and_mean_at_k(scores, threshold=1.0) == pytest.approx((2 / 3, 4.5 / 9))
    assert pass_and_mean_at_k(scores, threshold=0.5)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pass_and_mean_at_k([], 1.0)


def test_evaluator_scores_with_the_eval_reward_pass_at_k_and_extra_sets():
    """The held-out score is true_score, not the training score; pass@k samples are scored the same way."""
    answers = {"1+1=": "2", "2+2=": "4", "3+3=": "6"}

    def greedy(prompts):
        return [answers[p] if p != "2+2=" else "5" for p in prompts], [[1]] * len(prompts)

    def exact(prompts, responses, metadatas):
        return [float(r == m["answer"]) for r, m in zip(responses, metadatas, strict=True)]

    def sample_k(prompts):  # k = 2: "1+1=" right once, "2+2=" never, "3+3=" twice
        table = {"1+1=": ["2", "3"], "2+2=": ["5", "5"], "3+3=": ["6", "6"]}
        return [table[p] for p in prompts]

    ev = Evaluator(prompts=["1+1=", "2+2="], metadatas=[{"answer": "2"}, {"answer": "4"}], policy_greedy=greedy,
                   reference_greedy=greedy, score=lambda p, r, m: [0.3] * len(r), true_score=exact,
                   sample_k=sample_k, name="main", extra_sets={"extra": (["3+3="], [{"answer": "6"}])})
    m = ev(log=lambda _: None)
    assert m["eval/task_score"] == pytest.approx(0.5) and m["eval/reward_mean"] == pytest.approx(0.3)
    assert m["eval/set_task_score{eval_set=main}"] == pytest.approx(0.5)
    assert m["eval/pass_at_k"] == pytest.approx(0.5) and m["eval/mean_at_k"] == pytest.approx(0.25)
    assert m["eval/set_task_score{eval_set=extra}"] == 1.0 and m["eval/set_pass_at_k{eval_set=extra}"] == 1.0


def test_local_score_runs_rules_and_functions_in_process(tmp_path):
    """relay eval's scorer: the reward service's own classes and combiner, no Serve; an error scores 0."""
    from cluster.evaluation import local_score
    from reward_service.config import RewardSourceConfig

    fn = tmp_path / "my_reward.py"
    fn.write_text("def reward(prompt, response, **meta):\n"
                  "    if response == 'boom':\n        raise RuntimeError('boom')\n"
                  "    return 0.5 if response.strip() == meta['answer'] else 0.0\n")
    score = local_score([RewardSourceConfig(name="em", kind="rule", rule="exact_match", weight=2.0),
                         RewardSourceConfig(name="fn", kind="function", function=f"{fn}:reward")])
    metas = [{"answer": "4"}] * 3
    assert score(["2+2="] * 3, ["4", "5", "boom"], metas) == [2.5, 0.0, 0.0]
    assert score(["2+2="], [" 4 "], metas[:1]) == [2.5]  # a second call reuses the scorers
