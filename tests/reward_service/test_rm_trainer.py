import json
import math

import pytest

from learner.rm_trainer import load_preferences, make_synthetic_preferences, train_reward_model
from reward_service.config import RewardModelTrainConfig
from reward_service.models import RewardModel


def test_synthetic_preferences():
    pairs = make_synthetic_preferences(400, seed=1)
    assert len({p["prompt"] for p in pairs}) == 400  # one pair per distinct prompt
    for p in pairs:
        a, b = p["prompt"].rstrip("=").split("+")
        assert p["chosen"] == str(int(a) + int(b)) and p["rejected"] != p["chosen"] and p["rejected"].strip()
    kinds = [p["kind"] for p in pairs]
    assert 150 < kinds.count("close") < 250
    close = [p for p in pairs if p["kind"] == "close"]
    assert all(p["rejected"].isdigit() for p in close)
    assert make_synthetic_preferences(50, seed=1) == make_synthetic_preferences(50, seed=1)


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
    cfg = RewardModelTrainConfig(n_pairs=320, epochs=1, batch_size=32, eval_fraction=0.25, seed=0)
    logs: list[str] = []
    metrics = train_reward_model(cfg, tmp_path / "rm", log=logs.append)
    assert any(line.startswith("rm/epoch=1") for line in logs)
    assert metrics["rm/eval_loss"] < math.log(2)  # below the loss of a constant reward
    assert metrics["rm/eval_accuracy"] > 0.6
    model = RewardModel.from_pretrained(tmp_path / "rm").eval()  # what the Serve deployment loads
    assert model.max_length == cfg.max_length and model.pooling == "first"


def test_preferences_from_jsonl_path(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_synthetic_preferences(40, seed=2)))
    cfg = RewardModelTrainConfig(preferences_path=str(path), epochs=1, batch_size=16, eval_fraction=0.25)
    metrics = train_reward_model(cfg, tmp_path / "rm", log=lambda _: None)
    assert 0.0 <= metrics["rm/eval_accuracy"] <= 1.0 and (tmp_path / "rm" / "reward_head.safetensors").is_file()


@pytest.mark.slow
def test_rm_reaches_70_percent_held_out(tmp_path):
    """The quality bar: >= 0.70 held-out pairwise accuracy.

    Measured 0.78-0.79 after one epoch, 100-110 s of training on a busy 2-core CPU (over 2 min with setup).
    """
    metrics = train_reward_model(RewardModelTrainConfig(n_pairs=3000), tmp_path / "rm", log=print)
    assert metrics["rm/eval_accuracy"] >= 0.70
