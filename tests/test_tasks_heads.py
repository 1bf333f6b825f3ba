from __future__ import annotations

import math

import pytest
import torch

from dist_minbert.model.bert import BertConfig, BertEncoder, BertOutput
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.heads import BiMLPHead, CosineLogitHead, CosineScoreHead, ProjectionHead
from dist_minbert.tasks.multitask import MultitaskModel
from dist_minbert.tasks.pooling import POOLINGS
from dist_minbert.tasks.registry import BUILTIN_TASKS

torch.set_num_threads(1)
TINY = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)
B = 3


def _task(name: str, **overrides) -> TaskConfig:
    return TaskConfig(**{**BUILTIN_TASKS[name], **overrides})


def _model(tasks: dict[str, TaskConfig], pooling: str = "cls") -> MultitaskModel:
    torch.manual_seed(0)
    return MultitaskModel(BertEncoder(TINY), tasks, pooling)


def _ids(generator: torch.Generator, length: int, prefix: str = "") -> dict[str, torch.Tensor]:
    ids = torch.randint(5, 100, (B, length), generator=generator)
    mask = torch.ones(B, length, dtype=torch.int64)
    mask[0, length - 2:] = 0  # row 0 is padded
    ids[0, length - 2:] = 0
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask,
            f"{prefix}token_type_ids": torch.zeros(B, length, dtype=torch.int64)}


def _batch(encoding: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if encoding == "bi":
        return {**_ids(generator, 7, "a_"), **_ids(generator, 9, "b_")}
    return _ids(generator, 8)


@pytest.mark.parametrize(
    "name, head, encoding, shape",
    [
        ("sst", "linear", "single", (B, 5)),
        ("qqp", "cross", "cross", (B,)),
        ("qqp", "bi_mlp", "bi", (B,)),
        ("qqp", "bi_cosine", "bi", (B,)),
        ("sts", "cross", "cross", (B,)),
        ("sts", "bi_mlp", "bi", (B,)),
        ("sts", "bi_cosine", "bi", (B,)),
    ],
)
@pytest.mark.parametrize("pooling", ["cls", "pooler", "mean"])
def test_forward_shapes_and_finite_loss(name, head, encoding, shape, pooling):
    model = _model({name: _task(name, head=head)}, pooling)
    outputs = model(name, _batch(encoding))
    assert outputs.shape == shape
    labels = torch.tensor([0.0, 1.0, 1.0])
    assert torch.isfinite(model.loss(name, outputs, labels))


def test_cross_entropy_matches_hand_computation():
    model = _model({"sst": _task("sst")})
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 3.0]])
    labels = torch.tensor([0.0, 4.0])
    expected = (-(2 - math.log(math.e**2 + 4)) - (3 - math.log(math.e**3 + math.e + 3))) / 2
    assert model.loss("sst", logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_bce_matches_hand_computation():
    model = _model({"qqp": _task("qqp")})
    logits, labels = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -(math.log(0.5) + math.log(1 - sigmoid(2.0)) + math.log(1 - sigmoid(-1.0))) / 3
    assert model.loss("qqp", logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_mse_matches_hand_computation():
    model = _model({"sts": _task("sts")})
    scores, labels = torch.tensor([1.0, 4.5]), torch.tensor([2.0, 2.5])
    assert model.loss("sts", scores, labels).item() == pytest.approx((1.0 + 4.0) / 2)


def test_predict_maps_outputs_to_label_space():
    model = _model({"sst": _task("sst"), "qqp": _task("qqp"), "sts": _task("sts")})
    assert model.predict("sst", torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0]])).tolist() == [1, 4]
    assert model.predict("qqp", torch.tensor([-0.1, 0.1, 3.0])).tolist() == [0, 1, 1]
    assert model.predict("sts", torch.tensor([-1.0, 2.5, 7.0])).tolist() == [0.0, 2.5, 5.0]


def test_projection_head_is_an_affine_map():
    head = ProjectionHead(hidden_size=2, num_outputs=1, dropout=0.0)
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[2.0, -1.0]]))
        head.proj.bias.fill_(0.5)
    assert head(torch.tensor([[1.0, 3.0], [0.0, 0.0]])).tolist() == [-0.5, 0.5]


def test_bi_mlp_features_are_u_v_absdiff_product():
    head = BiMLPHead(hidden_size=1, num_outputs=1, dropout=0.0)
    first, second = head.mlp[1], head.mlp[4]
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))  # reads u, v, |u-v|, u*v
        first.bias.zero_()
        second.weight.fill_(1.0)
        second.bias.zero_()
    # u=2, v=3: 2 + 10·3 + 100·1 + 1000·6; u=2, v=-3: 2 - 30 + 500 - 6000 < 0, cut by the ReLU.
    assert head(torch.tensor([[2.0]]), torch.tensor([[3.0]])).item() == 6132.0
    assert head(torch.tensor([[2.0]]), torch.tensor([[-3.0]])).item() == 0.0


def test_cosine_score_spans_the_label_range():
    head = CosineScoreHead(0.0, 5.0)
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[2.0, 0.0], [-3.0, 0.0], [0.0, 4.0]])  # cos 1, -1, 0
    assert head(u, v).tolist() == pytest.approx([5.0, -5.0, 0.0])  # starts at 0 + cos · 5
    assert [p.shape for p in head.parameters()] == [torch.Size([1]), torch.Size([1])]


def test_cosine_logit_is_learnable_scale_and_bias():
    head = CosineLogitHead()
    u, v = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # cos 1, 1/√2
    logits = head(u, v)
    assert logits.tolist() == pytest.approx([5.0, 10 / math.sqrt(2) - 5])
    logits.sum().backward()
    assert head.scale.grad.item() == pytest.approx(1 + 1 / math.sqrt(2))
    assert head.bias.grad.item() == pytest.approx(2.0)


def test_mean_pooling_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2); last token is padding
    output = BertOutput(hidden, torch.zeros(1, 2))
    mask = torch.tensor([[1, 1, 0]])
    assert POOLINGS["mean"](output, mask).tolist() == [[2.0, 3.0]]
    assert POOLINGS["cls"](output, mask).tolist() == [[1.0, 2.0]]


def test_padding_does_not_change_outputs():
    model = _model({"sst": _task("sst")}, pooling="mean").eval()
    batch = _batch("single")
    longer = {key: torch.cat([value, torch.zeros(B, 3, dtype=value.dtype)], dim=1) for key, value in batch.items()}
    torch.testing.assert_close(model("sst", longer), model("sst", batch), rtol=1e-5, atol=1e-6)


def test_parameters_split_into_shared_encoder_and_per_task_heads():
    tasks = {"sst": _task("sst"), "qqp": _task("qqp", head="bi_mlp"), "sts": _task("sts", head="bi_cosine")}
    model = _model(tasks)
    shared = {id(p) for p in model.shared_parameters()}
    per_task = {name: {id(p) for p in model.task_parameters(name)} for name in tasks}
    assert len(per_task["sts"]) == 2  # the cosine score's scale and bias
    assert shared.isdisjoint(per_task["sst"]) and shared.isdisjoint(per_task["qqp"]) and shared.isdisjoint(per_task["sts"])
    assert shared | per_task["sst"] | per_task["qqp"] | per_task["sts"] == {id(p) for p in model.parameters()}
    model.loss("qqp", model("qqp", _batch("bi")), torch.tensor([0.0, 1.0, 1.0])).backward()
    assert all(p.grad is None for p in model.task_parameters("sst"))
    assert all(p.grad is not None for p in model.task_parameters("qqp"))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())


def test_head_dropout_follows_the_encoder_config():
    encoder = BertEncoder(BertConfig(**{**TINY.__dict__, "hidden_dropout_prob": 0.3}))
    model = MultitaskModel(encoder, {"sst": _task("sst")}, "cls")
    assert model.heads["sst"].dropout.p == 0.3


def test_unknown_pooling_is_an_error():
    with pytest.raises(ValueError, match="^pooling: 'max'"):
        _model({"sst": _task("sst")}, pooling="max")
