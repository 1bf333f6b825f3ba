"""MinBERT encoder: parity with transformers.BertModel (eval and training step), padding invariance, dropout, configs."""

from __future__ import annotations

import pytest
import torch
import transformers

from dist_minbert.model.bert import BertConfig, BertEncoder, BertOutput
from dist_minbert.model.checkpoint import load_encoder, native_to_hf, resolve_checkpoint
from dist_minbert.model.config import ModelConfig

torch.set_num_threads(1)

PAIRS = [
    ("The movie is a charming, if slight, romantic comedy.", "A man is playing a guitar."),
    ("It's a bad sign when you're rooting for the film to end.", "How do I learn Python quickly?"),
    ("Unflinchingly bleak and desperate", "A woman is slicing an onion into thin rings on a wooden board."),
]


@pytest.fixture(scope="module")
def encoder() -> BertEncoder:
    return load_encoder("embedded").eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(resolve_checkpoint("embedded"))


@pytest.fixture(scope="module")
def batch(hf_tokenizer) -> dict[str, torch.Tensor]:
    """Cross-encoded pairs of different lengths: padding in every row but the longest, token types 0 and 1."""
    a, b = zip(*PAIRS)
    enc = hf_tokenizer(list(a), list(b), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any() and (enc["token_type_ids"] == 1).any()
    return dict(enc)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_matches_transformers_bert_model(encoder, batch, attn_implementation):
    reference = transformers.BertModel.from_pretrained(
        resolve_checkpoint("embedded"), attn_implementation=attn_implementation
    ).eval()
    with torch.no_grad():
        expected = reference(**batch)
        ours = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    real = batch["attention_mask"].bool()
    # Padded positions are compared too: HF lets them attend to the real keys exactly as we do.
    assert (ours.last_hidden_state - expected.last_hidden_state).abs().max() < 1e-5
    assert (ours.last_hidden_state[real] - expected.last_hidden_state[real]).abs().max() < 1e-5
    assert (ours.pooler_output - expected.pooler_output).abs().max() < 1e-5


def test_padding_does_not_change_real_token_outputs(encoder, batch):
    extra = 17
    padded = {
        "input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=encoder.config.pad_token_id),
        "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra), value=0),
        "token_type_ids": torch.nn.functional.pad(batch["token_type_ids"], (0, extra), value=0),
    }
    with torch.no_grad():
        short = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        long = encoder(padded["input_ids"], padded["attention_mask"], padded["token_type_ids"])
        for row in range(len(PAIRS)):  # each row alone, without any padding at all
            n = int(batch["attention_mask"][row].sum())
            alone = encoder(
                batch["input_ids"][row : row + 1, :n],
                batch["attention_mask"][row : row + 1, :n],
                batch["token_type_ids"][row : row + 1, :n],
            )
            assert (alone.last_hidden_state[0] - long.last_hidden_state[row, :n]).abs().max() < 1e-5
            assert (alone.pooler_output[0] - long.pooler_output[row]).abs().max() < 1e-5
    real = batch["attention_mask"].bool()
    width = batch["input_ids"].size(1)
    assert (short.last_hidden_state[real] - long.last_hidden_state[:, :width][real]).abs().max() < 1e-5
    assert (short.pooler_output - long.pooler_output).abs().max() < 1e-5


# The training path: train mode with autograd recording runs only the real tokens through the per-token layers.
LOSS_LENGTH = 128  # positions covered by the fixed loss weights; longer than any batch below
Grads = dict[str, torch.Tensor]  # parameter gradients under HF BertModel names


@pytest.fixture(scope="module")
def train_encoder() -> BertEncoder:
    return load_encoder("embedded", dropout=0.0).train()


def _hf_train_model(attn_implementation: str) -> transformers.BertModel:
    return transformers.BertModel.from_pretrained(
        resolve_checkpoint("embedded"), attn_implementation=attn_implementation, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    ).train()  # fmt: skip


@pytest.fixture(scope="module")
def hf_train_model() -> transformers.BertModel:
    """The reference in train mode with dropout 0: it computes every position, padding included."""
    return _hf_train_model("eager")


@pytest.fixture(scope="module")
def loss_weights(train_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-position and pooler weights: a token placed in the wrong row or position changes the loss."""
    generator = torch.Generator().manual_seed(0)
    hidden = train_encoder.config.hidden_size
    return torch.randn(len(PAIRS), LOSS_LENGTH, hidden, generator=generator), torch.randn(hidden, generator=generator)


def _loss(hidden, pooled, attention_mask, weights) -> torch.Tensor:
    """Weighted mean over the real tokens of last_hidden_state, plus a weighted pooler output; padding reads as 0."""
    token_weights, pooler_weights = weights
    per_token = (hidden * token_weights[:, : hidden.size(1)]).sum(-1)  # (B, T)
    mask = attention_mask.to(hidden.dtype)
    return (per_token * mask).sum() / mask.sum() + (pooled * pooler_weights).sum()


def _our_step(encoder: BertEncoder, batch, weights) -> tuple[BertOutput, Grads]:
    encoder.zero_grad(set_to_none=True)
    out = encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    _loss(*out, batch["attention_mask"], weights).backward()
    missing = [name for name, p in encoder.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reached {missing}"
    grads = native_to_hf({name: p.grad for name, p in encoder.named_parameters()})
    return BertOutput(*(t.detach() for t in out)), grads


def _hf_step(model: transformers.BertModel, batch, weights) -> tuple[BertOutput, Grads]:
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    _loss(out.last_hidden_state, out.pooler_output, batch["attention_mask"], weights).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return BertOutput(out.last_hidden_state.detach(), out.pooler_output.detach()), grads


def _assert_outputs_match(ours: BertOutput, expected: BertOutput, attention_mask: torch.Tensor) -> None:
    real = attention_mask.bool()
    assert (ours.last_hidden_state[real] - expected.last_hidden_state[real]).abs().max() < 1e-5
    assert (ours.pooler_output - expected.pooler_output).abs().max() < 1e-5


def _assert_grads_match(ours: Grads, expected: Grads, rtol: float) -> None:
    """Every gradient within rtol of the largest gradient entry of the reference."""
    assert ours.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    error, name = max(((ours[k] - expected[k]).abs().max().item(), k) for k in expected)
    assert error < rtol * scale, f"{name}: gradient differs by {error:.3g}, largest gradient {scale:.3g}"


def _padded(batch: dict[str, torch.Tensor], extra: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    values = {"input_ids": pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    return {k: torch.nn.functional.pad(v, (0, extra), value=values[k]) for k, v in batch.items()}


@pytest.fixture(scope="module")
def training_steps(train_encoder, hf_train_model, batch, loss_weights):
    """One forward + backward of each model on the padded batch: (ours, HF's), each (outputs, gradients)."""
    return _our_step(train_encoder, batch, loss_weights), _hf_step(hf_train_model, batch, loss_weights)


def test_training_step_outputs_match_transformers_and_padding_is_zero(training_steps, batch):
    (ours, _), (expected, _) = training_steps
    _assert_outputs_match(ours, expected, batch["attention_mask"])
    padding = ~batch["attention_mask"].bool()
    assert padding.sum() > 0 and torch.count_nonzero(ours.last_hidden_state[padding]) == 0  # skipped, never computed


def test_training_step_gradients_match_transformers(training_steps):
    (_, ours), (_, expected) = training_steps
    _assert_grads_match(ours, expected, rtol=1e-4)


def test_training_step_gradients_do_not_depend_on_padding_length(train_encoder, training_steps, batch, loss_weights):
    (short, short_grads), (expected, expected_grads) = training_steps
    long_batch = _padded(batch, extra=23, pad_token_id=train_encoder.config.pad_token_id)
    long, long_grads = _our_step(train_encoder, long_batch, loss_weights)
    width = batch["input_ids"].size(1)
    long_cut = BertOutput(long.last_hidden_state[:, :width], long.pooler_output)
    _assert_outputs_match(long_cut, short, batch["attention_mask"])
    assert torch.count_nonzero(long.last_hidden_state[~long_batch["attention_mask"].bool()]) == 0
    _assert_grads_match(long_grads, short_grads, rtol=1e-5)
    # A packing error that is the same at both lengths passes the comparison above; BertModel catches it.
    _assert_outputs_match(long_cut, expected, batch["attention_mask"])
    _assert_grads_match(long_grads, expected_grads, rtol=1e-4)


def _unpadded_batch(hf_tokenizer, batch) -> dict[str, torch.Tensor]:
    """Every pair truncated to 12 tokens: not a single padding position, still two segments."""
    a, b = zip(*PAIRS)
    enc = hf_tokenizer(list(a), list(b), truncation=True, max_length=12, padding=True, return_tensors="pt")
    assert enc["attention_mask"].all() and (enc["token_type_ids"] == 1).any()
    return dict(enc)


def _cls_only_row_batch(hf_tokenizer, batch) -> dict[str, torch.Tensor]:
    """The padded batch with its middle row replaced by [CLS] and nothing but padding after it."""
    edited = {k: v.clone() for k, v in batch.items()}
    edited["input_ids"][1] = hf_tokenizer.pad_token_id
    edited["input_ids"][1, 0] = hf_tokenizer.cls_token_id
    edited["attention_mask"][1] = 0
    edited["attention_mask"][1, 0] = 1
    edited["token_type_ids"][1] = 0
    return edited


@pytest.mark.parametrize("make_batch", [_unpadded_batch, _cls_only_row_batch], ids=["no_padding", "cls_only_row"])
def test_training_and_eval_paths_match_transformers_on_edge_batches(
    train_encoder, hf_train_model, hf_tokenizer, batch, loss_weights, make_batch
):
    edge = make_batch(hf_tokenizer, batch)
    expected, expected_grads = _hf_step(hf_train_model, edge, loss_weights)
    try:
        for mode in ("train", "eval"):  # skip padding / compute every position; both record gradients here
            ours, grads = _our_step(getattr(train_encoder, mode)(), edge, loss_weights)
            _assert_outputs_match(ours, expected, edge["attention_mask"])
            _assert_grads_match(grads, expected_grads, rtol=1e-4)
            if mode == "train":
                assert torch.count_nonzero(ours.last_hidden_state[~edge["attention_mask"].bool()]) == 0
    finally:
        train_encoder.train()


def test_missing_token_types_mean_segment_a(encoder, batch):
    with torch.no_grad():
        implicit = encoder(batch["input_ids"], batch["attention_mask"])
        explicit = encoder(batch["input_ids"], batch["attention_mask"], torch.zeros_like(batch["input_ids"]))
    assert torch.equal(implicit.last_hidden_state, explicit.last_hidden_state)


def test_model_config_dropout_overrides_checkpoint_dropout(encoder, batch):
    assert encoder.config.hidden_dropout_prob == 0.1  # the checkpoint's own value
    config = ModelConfig(dropout=0.3)
    dropped = load_encoder(config.checkpoint, dropout=config.dropout)
    assert dropped.config.hidden_dropout_prob == dropped.config.attention_probs_dropout_prob == 0.3
    assert {m.p for m in dropped.modules() if isinstance(m, torch.nn.Dropout)} == {0.3}
    assert {layer.attn.dropout_p for layer in dropped.layers} == {0.3}

    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        reference = encoder(*inputs).last_hidden_state
        torch.manual_seed(0)
        noisy = dropped.train()(*inputs).last_hidden_state
        quiet = load_encoder("embedded", dropout=0.0).train()(*inputs).last_hidden_state
        evaluated = dropped.eval()(*inputs).last_hidden_state
    assert (noisy - reference).abs().max() > 1e-2  # dropout is active in training...
    assert (quiet - reference).abs().max() < 1e-6  # ...and p=0 really turns every dropout off
    assert (evaluated - reference).abs().max() < 1e-6  # ...and none is applied in eval mode


def test_attention_dropout_alone_changes_training_outputs(batch):
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = BertEncoder(config)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    with torch.no_grad():
        assert not torch.allclose(encoder.train()(*inputs).last_hidden_state, encoder.eval()(*inputs).last_hidden_state)


def test_random_init_has_zero_pad_embedding_and_bert_scale():
    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=1, num_attention_heads=4))
    assert torch.count_nonzero(encoder.embeddings.word.weight[0]) == 0
    assert abs(encoder.embeddings.word.weight[1:].std().item() - 0.02) < 2e-3


def test_too_long_input_names_the_limit(encoder):
    ids = torch.ones(1, encoder.config.max_position_embeddings + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_position_embeddings 512"):
        encoder(ids, torch.ones_like(ids))


def test_bert_config_round_trips_through_hf_dict():
    config = BertConfig(vocab_size=100, hidden_size=48, num_attention_heads=6, hidden_dropout_prob=0.2)
    hf = config.to_hf_dict()
    assert hf["model_type"] == "bert" and hf["hidden_size"] == 48
    assert BertConfig.from_hf_dict({**hf, "initializer_range": 0.02, "use_cache": True}) == config


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"model_type": "roberta"}, "model_type"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"),
    ],
)
def test_bert_config_rejects_unsupported_architectures(overrides, field):
    with pytest.raises(ValueError, match=f"^{field}: .*allowed: "):
        BertConfig.from_hf_dict({**BertConfig().to_hf_dict(), **overrides})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"checkpoint": ""}, "checkpoint"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_length": 2}, "max_length"),
    ],
)
def test_model_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}: .*allowed: "):
        ModelConfig(**kwargs)


def test_an_unknown_pooling_is_refused_by_the_loader_naming_the_key():
    from dist_minbert.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.pooling.*allowed: 'cls', 'pooler', 'mean'"):
        load_config(None, ["model.pooling=max"])


@pytest.fixture(scope="module")
def hf_sdpa_train_model() -> transformers.BertModel:
    """The peer of `bench encoder` (SDPA attention) in train mode with dropout 0."""
    return _hf_train_model("sdpa")


@pytest.mark.parametrize("make_batch", [None, _unpadded_batch], ids=["padded", "no_padding"])
def test_training_step_under_bf16_autocast_matches_transformers(
    train_encoder, hf_sdpa_train_model, hf_tokenizer, batch, loss_weights, make_batch
):
    """bf16 autocast (CPU), as `bench encoder` times it: both round the same matmul inputs to bf16, so outputs and
    gradients agree to bf16's resolution (8 bits of mantissa), on the padding skip and on the all-real path."""
    edge = make_batch(hf_tokenizer, batch) if make_batch else batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, grads = _our_step(train_encoder, edge, loss_weights)
        expected, expected_grads = _hf_step(hf_sdpa_train_model, edge, loss_weights)
    real = edge["attention_mask"].bool()
    hidden_error = (ours.last_hidden_state[real].float() - expected.last_hidden_state[real].float()).abs().max()
    pooled_error = (ours.pooler_output.float() - expected.pooler_output.float()).abs().max()
    scale = max(g.abs().max().item() for g in expected_grads.values())
    grad_error = max((grads[k] - expected_grads[k]).abs().max().item() for k in expected_grads)
    assert ours.last_hidden_state.dtype == expected.last_hidden_state.dtype
    assert hidden_error < 1e-2 and pooled_error < 1e-2  # measured: 0 (the same roundings in the same order)
    assert grad_error < 1e-2 * scale  # measured: 6e-4 (padded), 1.2e-3 (no padding) of the largest gradient


def test_attention_dropout_path_keeping_everything_matches_the_sdpa_path(train_encoder, hf_tokenizer, batch,
                                                                         loss_weights):
    """A training step with dropout on takes our attention (its own weights dropout) instead of SDPA's kernel;
    with p so small that nothing is dropped, it must compute what SDPA computes, padded or not."""
    nearly_zero = load_encoder("embedded", dropout=1e-15).train()
    assert all(layer.attn.dropout_p > 0 for layer in nearly_zero.layers)
    for edge in (batch, _unpadded_batch(hf_tokenizer, batch)):
        expected, expected_grads = _our_step(train_encoder, edge, loss_weights)
        ours, grads = _our_step(nearly_zero, edge, loss_weights)
        _assert_outputs_match(ours, expected, edge["attention_mask"])
        _assert_grads_match(grads, expected_grads, rtol=1e-5)


def test_attention_dropout_zeroes_weights_and_rescales_through_the_projection(batch):
    """The CPU dropout path against the definition: softmax(q k^T / sqrt(hs) + mask), each weight zeroed with
    probability p else divided by 1 - p (the same draws, replayed from the seed), times v, then the projection."""
    from dist_minbert.model.bert import TokenLayout
    from dist_minbert.model.dropout import keep_factors

    p = 0.3
    attention = load_encoder("embedded", dropout=p).layers[0].attn.train()
    B, T = batch["input_ids"].shape
    H, nh = attention.proj.in_features, attention.num_heads
    x = torch.randn(B * T, H, generator=torch.Generator().manual_seed(0))
    real = batch["attention_mask"].bool()
    torch.manual_seed(11)
    ours = attention(x, real[:, None, None, :], TokenLayout(B, T, None))
    with torch.no_grad():
        q, k, v = attention.qkv(x).view(B, T, 3, nh, H // nh).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (H // nh) ** 0.5 + torch.where(real, 0.0, -torch.inf)[:, None, None, :]
        torch.manual_seed(11)
        kept = keep_factors(torch.Size([B * nh, T, T]), p).view(B, nh, T, T)
        weights = torch.softmax(scores, dim=-1) * kept / (1 - p)
        expected = attention.proj((weights @ v).transpose(1, 2).reshape(B * T, H))
    assert 0.6 < kept.mean() < 0.8
    assert (ours - expected).abs().max() < 1e-5
