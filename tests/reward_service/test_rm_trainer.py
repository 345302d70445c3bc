import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from core.data import AdditionConfig
from learner.bootstrap import TinyModelConfig, build_tiny_model, build_tokenizer
from learner.rm_trainer import (
    ENSEMBLE_FILE,
    Problem,
    _normalize,
    _share,
    _split,
    addition_problems,
    ensemble_score,
    evaluate,
    load_preferences,
    make_policy_preferences,
    make_synthetic_preferences,
    policy_pair_accuracy,
    train_reward_model,
)
from reward_service.config import RewardModelTrainConfig, RewardSourceConfig
from reward_service.models import RewardModel

MINILM = {"init": "backbone", "policy_samples": 0, "lr": 5e-5, "batch_size": 32, "freeze_embeddings": True}


def _problems(n: int, seed: int = 1) -> list[Problem]:
    return addition_problems(AdditionConfig(n_train=n, n_eval=1, seed=seed))[0]


def test_synthetic_preferences():
    pairs = make_synthetic_preferences(_problems(400), seed=1, clear_fraction=0.5)
    assert len({p["prompt"] for p in pairs}) == 400  # one pair per distinct prompt
    for p in pairs:
        a, b = p["prompt"].rstrip("=").split("+")
        assert p["chosen"] == str(int(a) + int(b)) and p["rejected"] != p["chosen"] and p["rejected"].strip()
    kinds = [p["kind"] for p in pairs]
    assert 150 < kinds.count("close") < 250
    close = [p for p in pairs if p["kind"] == "close"]
    assert all(p["rejected"].isdigit() for p in close)
    assert make_synthetic_preferences(_problems(50), seed=1) == make_synthetic_preferences(_problems(50), seed=1)
    assert {p["kind"] for p in make_synthetic_preferences(_problems(50), clear_fraction=0.0)} == {"close"}


def test_policy_preferences_pair_the_answer_against_a_wrong_sample():
    problems = [Problem("1+1=", "2"), Problem("2+2=", "4"), Problem("3+3=", "6")]
    samples = [["2", "3", " 2 "], ["4", "4", "4"], ["7", "6", "x"]]
    pairs = make_policy_preferences(samples, problems, seed=0)
    assert [p["prompt"] for p in pairs] == ["1+1=", "3+3="]  # 2+2= was always right: no pair
    assert pairs[0] == {"prompt": "1+1=", "chosen": "2", "rejected": "3", "kind": "policy"}
    assert pairs[1]["chosen"] == "6" and pairs[1]["rejected"] in {"7", "x"}


def test_policy_pair_accuracy_by_hand():
    problems = [Problem("1+1=", "2"), Problem("2+2=", "4")]
    samples = [["2", "3", "5"], ["4", "1", "4"]]
    table = {"1+1=2": 1.0, "1+1=3": 2.0, "1+1=5": 0.0, "2+2=4": 3.0, "2+2=1": 3.0}
    model = SimpleNamespace(eval=lambda: None, score=lambda texts: ([table[t] for t in texts], 0))
    out = policy_pair_accuracy(model.score, problems, samples)
    # Within prompts: 1+1: right 1.0 vs wrong {2.0, 0.0} -> 1 of 2; 2+2: right {3, 3} vs wrong {3} -> 2 ties = 1.
    assert out["pair_accuracy"] == pytest.approx(2 / 4)
    # Across prompts: right {1, 3, 3} vs wrong {2, 0, 3}: wins 1+2+2 = 5, ties 2 -> (5 + 1) / 9.
    assert out["auc"] == pytest.approx(6 / 9)
    assert out["sample_accuracy"] == pytest.approx(3 / 6)


def test_split_is_by_prompt():
    pairs = [{"prompt": f"{i}+0=", "chosen": str(i), "rejected": "x", "n": j} for i in range(50) for j in range(2)]
    train, held = _split(pairs, 0.2, seed=0)
    assert len(held) == 20 and len(train) == 80
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in held}


def test_load_preferences_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n\n')
    assert load_preferences(good) == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n{"prompt": "1+1=", "chosen": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing or non-string field\(s\) \['chosen', 'rejected'\]"):
        load_preferences(bad)
    (tmp_path / "nojson.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match="nojson.jsonl:1: not valid JSON"):
        load_preferences(tmp_path / "nojson.jsonl")


def test_train_on_a_tiny_slice_learns_and_saves(tmp_path):
    cfg = RewardModelTrainConfig(n_pairs=320, epochs=1, eval_fraction=0.25, seed=0, clear_fraction=0.5, **MINILM)
    logs: list[str] = []
    metrics = train_reward_model(cfg, tmp_path / "rm", log=logs.append)
    assert any(line.startswith("rm/epoch=1") for line in logs)
    assert metrics["rm/eval_loss"] < math.log(2)  # below the loss of a constant reward
    assert metrics["rm/eval_accuracy"] > 0.6
    model = RewardModel.from_pretrained(tmp_path / "rm").eval()  # what the Serve deployment loads
    assert model.max_length == cfg.max_length and model.pooling == "first"


def test_preferences_from_jsonl_path(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_synthetic_preferences(_problems(40), seed=2)))
    cfg = RewardModelTrainConfig(preferences_path=str(path), epochs=1, eval_fraction=0.25, **MINILM)
    metrics = train_reward_model(cfg, tmp_path / "rm", log=lambda _: None)
    assert 0.0 <= metrics["rm/eval_accuracy"] <= 1.0 and (tmp_path / "rm" / "reward_head.safetensors").is_file()


def test_from_the_policy_with_policy_pairs(tmp_path):
    """The default: start from the (here untrained, 1-layer) policy, pair its samples, rank its held-out samples."""
    policy = _tiny_policy(tmp_path)
    problems = addition_problems(AdditionConfig(n_train=120, n_eval=40))
    cfg = RewardModelTrainConfig(policy_samples=2, n_pairs=60, epochs=1, eval_fraction=0.25)
    logs: list[str] = []
    metrics = train_reward_model(cfg, tmp_path / "rm", problems=problems, policy_path=policy, log=logs.append)
    assert any(line.startswith("rm/policy_pairs=") for line in logs)
    assert "rm/eval_accuracy_policy" in metrics and "rm/eval_accuracy_close" in metrics
    assert 0.0 <= metrics["rm/policy_sample_accuracy"] <= 1.0 and "rm/policy_auc" in metrics
    model = RewardModel.from_pretrained(tmp_path / "rm")
    assert model.pooling == "last"  # a causal backbone is read at its last token
    scores, _ = model.score(["12+30=42", "12+30=4"])
    assert all(math.isfinite(x) for x in scores)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    """With ``patience`` the run stops once the held-out loss has not improved for that many epochs, and the saved
    model is the best epoch's: its held-out loss is the lowest one logged. 20 training pairs and 30 epochs overfit
    for certain, so the stop is exercised."""
    policy = _tiny_policy(tmp_path)
    problems = addition_problems(AdditionConfig(n_train=40, n_eval=10))
    cfg = RewardModelTrainConfig(policy_samples=0, n_pairs=40, epochs=30, patience=2, eval_fraction=0.5,
                                 batch_size=8, lr=3e-3, normalize=False)
    logs: list[str] = []
    metrics = train_reward_model(cfg, tmp_path / "rm", problems=problems, policy_path=policy, log=logs.append)
    losses = [float(line.split("rm/eval_loss=")[1].split()[0]) for line in logs if line.startswith("rm/epoch=")]
    best = min(range(len(losses)), key=losses.__getitem__) + 1
    assert metrics["rm/epochs_run"] == len(losses) < cfg.epochs  # it stopped early ...
    assert len(losses) - best == cfg.patience  # ... `patience` epochs after the best one
    assert metrics["rm/epoch"] == best and metrics["rm/eval_loss"] == pytest.approx(losses[best - 1], rel=1e-3)
    pairs = make_synthetic_preferences(problems[0][:cfg.n_pairs], cfg.seed, cfg.clear_fraction)
    _, held_out = _split(pairs, cfg.eval_fraction, cfg.seed)
    saved = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert evaluate(saved.score, held_out)["loss"] == pytest.approx(losses[best - 1], rel=1e-3)  # best weights


def _tiny_policy(tmp_path) -> Path:
    tokenizer = build_tokenizer()
    policy = tmp_path / "policy"
    build_tiny_model(tokenizer, TinyModelConfig(num_layers=1)).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    return policy


def test_normalize_folds_mean_0_std_1_into_the_head(tmp_path):
    """Ziegler et al. 2019: over the policy's samples the normalised model scores mean 0, std 1; the folded head
    equals standardising the raw scores (a second formulation), and the order of any two texts is unchanged."""
    model = RewardModel.from_backbone(_tiny_policy(tmp_path), max_length=16).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    torch.nn.init.constant_(model.head.bias, 3.0)
    problems = [Problem(f"{a}+{a}=", str(2 * a)) for a in range(10, 30)]
    samples = [[str(2 * p + d) for d in (0, 1, -3)] for p in range(10, 30)]
    texts = [p.prompt + r for p, rs in zip(problems, samples, strict=True) for r in rs]
    raw = torch.tensor(model.score(texts)[0])
    stats = _normalize(model, problems, samples)
    scaled = torch.tensor(model.score(texts)[0])
    assert stats["rm/raw_score_mean"] == pytest.approx(raw.mean().item(), abs=1e-5)
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-4) and scaled.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(scaled, (raw - raw.mean()) / raw.std(), atol=1e-4)


def test_ensemble_score_by_hand_and_as_served():
    """mean - penalty * population std, the formula of reward_service.scorers.RewardEnsemble (see its docstring)."""
    a = SimpleNamespace(score=lambda texts: ([1.0 for _ in texts], 0))
    b = SimpleNamespace(score=lambda texts: ([3.0 for _ in texts], 0))
    scores, _ = ensemble_score([a, b], penalty=0.5)(["x", "y"])
    assert scores == pytest.approx([2.0 - 0.5 * 1.0] * 2)  # mean 2, std |3 - 1| / 2 = 1
    assert RewardSourceConfig(name="e", kind="ensemble", model_paths=["a", "b"]).uncertainty_penalty == 0.0


def test_disjoint_shares_split_by_prompt_and_cover_the_pairs():
    pairs = [{"prompt": f"{i}+0=", "chosen": str(i), "rejected": "x", "n": j} for i in range(30) for j in range(2)]
    shares = [_share(pairs, k, 3) for k in range(3)]
    prompts = [{p["prompt"] for p in share} for share in shares]
    assert sum(len(s) for s in shares) == len(pairs) and all(len(p) == 10 for p in prompts)
    assert not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2]) and not (prompts[0] & prompts[2])


def test_an_ensemble_of_two_on_disjoint_shares(tmp_path):
    problems = addition_problems(AdditionConfig(n_train=120, n_eval=40))
    cfg = RewardModelTrainConfig(policy_samples=2, n_pairs=60, epochs=1, eval_fraction=0.25, ensemble_size=2,
                                 ensemble_data="disjoint", uncertainty_penalty=0.5)
    logs: list[str] = []
    metrics = train_reward_model(cfg, tmp_path / "rm", problems=problems, policy_path=_tiny_policy(tmp_path),
                                 log=logs.append)
    assert json.loads((tmp_path / "rm" / ENSEMBLE_FILE).read_text()) == {
        "members": ["member_0", "member_1"], "uncertainty_penalty": 0.5}
    members = [RewardModel.from_pretrained(tmp_path / "rm" / f"member_{k}").eval() for k in range(2)]
    # each member saw about half the training pairs, and the ensemble's metrics are reported beside the members'
    starts = [line for line in logs if "rm/start" in line]
    assert len(starts) == 2 and all(line.startswith(f"member {k}/2") for k, line in enumerate(starts))
    assert {"rm/member_0/eval_accuracy", "rm/member_1/policy_auc", "rm/eval_accuracy", "rm/policy_auc"} <= set(metrics)
    assert metrics["rm/train_time_s"] == pytest.approx(metrics["rm/member_0/train_time_s"] +
                                                       metrics["rm/member_1/train_time_s"])
    # normalised members: the held-out policy samples score about mean 0 each (std 1 is tested above)
    assert all(abs(m.score(["12+30=42", "12+30=41"])[0][0]) < 10 for m in members)


def test_policy_init_without_a_policy_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="need the SFT policy checkpoint"):
        train_reward_model(RewardModelTrainConfig(), tmp_path / "rm")
    with pytest.raises(ValueError, match=r"reward_model.n_pairs \(200\) exceeds the task's 100 training prompts"):
        train_reward_model(RewardModelTrainConfig(n_pairs=200, **MINILM), tmp_path / "rm",
                           problems=addition_problems(AdditionConfig(n_train=100)))


@pytest.mark.slow
def test_default_rm_ranks_the_policys_own_samples(tmp_path):
    """The quality bar on the embedded default: >= 0.70 held-out pairwise accuracy, and the SFT policy's
    correct samples ranked above its wrong ones (same held-out prompt) at least 85% of the time.

    The default recipe at 12 epochs, not the default 40 (about 16 minutes here): the bar is the recipe's, and the
    40-epoch figures come from the pipeline runs in the README. Measured at 12 epochs from this machine's default
    SFT start (0.334, 2026-12-05): pairwise 0.951, policy pairs 0.947 (AUC 0.925), in about 290 s on 2 cores (plus
    the SFT policy build when it is not cached). The MiniLM reward model it replaced ranked the policy's samples at
    chance (0.51).
    """
    from cluster.config import RelayConfig
    from learner.bootstrap import ensure_default_policy

    cfg = RelayConfig()
    policy = ensure_default_policy(Path(cfg.model.cache_dir), cfg.sft, cfg.model.tiny, cfg.data)
    metrics = train_reward_model(cfg.reward_model.model_copy(update={"epochs": 12}), tmp_path / "rm",
                                 problems=addition_problems(), policy_path=policy, log=print)
    assert metrics["rm/eval_accuracy"] >= 0.70
    assert metrics["rm/policy_pair_accuracy"] >= 0.85
