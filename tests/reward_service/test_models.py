import torch

from reward_service.models import RewardModel, default_pooling, pool
from tests.reward_service.tiny_rm import save_tiny_rm


def test_pooling_by_hand():
    hidden = torch.arange(2 * 3 * 1, dtype=torch.float32).reshape(2, 3, 1)  # (B=2, T=3, H=1)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert pool(hidden, right, "first").squeeze(-1).tolist() == [0.0, 3.0]
    assert pool(hidden, right, "last").squeeze(-1).tolist() == [1.0, 5.0]
    assert pool(hidden, left, "last").squeeze(-1).tolist() == [2.0, 5.0]
    assert pool(hidden, right, "mean").squeeze(-1).tolist() == [0.5, 4.0]


def test_default_pooling_by_architecture():
    from transformers import BertConfig, Qwen2Config

    assert default_pooling(BertConfig(architectures=["BertModel"])) == "first"
    assert default_pooling(Qwen2Config(architectures=["Qwen2ForCausalLM"])) == "last"


def test_save_and_reload_by_path(tmp_path):
    path = save_tiny_rm(tmp_path / "rm", seed=1, max_length=8)
    model = RewardModel.from_pretrained(path).eval()
    texts = ["1+1=2", "12+34=46", "a long text that certainly exceeds eight tokens"]
    scores, truncated = model.score(texts)
    again, _ = RewardModel.from_pretrained(path).eval().score(texts)
    assert scores == again and truncated == 1
    assert model.pooling == "first" and model.max_length == 8
    assert RewardModel.from_pretrained(path, pooling="mean").pooling == "mean"


def test_constant_head(tmp_path):
    model = RewardModel.from_pretrained(save_tiny_rm(tmp_path / "c", constant=2.5)).eval()
    assert model.score(["1+1=2", "zz"])[0] == [2.5, 2.5]
