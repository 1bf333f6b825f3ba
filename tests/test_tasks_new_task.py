"""A task that exists only as a TaskConfig: read from disk, tokenized, collated, one training step."""

from __future__ import annotations

import torch

from dist_minbert.data.collate import collate
from dist_minbert.model.bert import BertConfig, BertEncoder
from dist_minbert.model.tokenizer import WordPieceTokenizer
from dist_minbert.tasks.config import TaskConfig, encoding_for
from dist_minbert.tasks.multitask import MultitaskModel
from dist_minbert.tasks.readers import read_task_file

torch.set_num_threads(1)
WORDS = ["good", "bad", "great", "awful", "movie", "plot", "the", "a", "was", "!"]
REVIEWS = (
    "review_id,verdict,body\n"
    "r1,1,The movie was great !\n"
    "r2,0,An awful plot\n"  # "an" is not in the vocabulary: [UNK]
    "r3,1,A good movie\n"
    "r4,0,bad\n"
)


def test_yaml_only_binary_task_reads_and_trains_one_step(tmp_path):
    checkpoint = tmp_path / "tiny-checkpoint"
    checkpoint.mkdir()
    (checkpoint / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    data = tmp_path / "reviews.tsv"
    data.write_text(REVIEWS.replace(",", "\t"))
    task = TaskConfig(kind="classification", train=str(data), text_columns=["body"], label_column="verdict",
                      id_column="review_id", num_classes=2, head="linear", metric="accuracy",
                      prediction_column="Predicted_Verdict", batch_size=4)

    rows = read_task_file(task.train, task, labelled=True, on_bad_row="error")
    assert rows.ids == ["r1", "r2", "r3", "r4"] and rows.labels == [1.0, 0.0, 1.0, 0.0]
    tokenizer = WordPieceTokenizer.from_checkpoint(str(checkpoint))
    token_ids = tokenizer.encode(rows.a)
    assert token_ids[3] == [5 + WORDS.index("bad")]
    batch = collate({"a": token_ids, "label": rows.labels}, encoding_for(task), 16,
                    tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id).tensors

    torch.manual_seed(0)
    encoder = BertEncoder(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    model = MultitaskModel(encoder, {"reviews": task}, pooling="cls")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    head_before = [p.detach().clone() for p in model.task_parameters("reviews")]

    outputs = model("reviews", batch)
    assert outputs.shape == (4,)  # one logit per review: binary → BCE
    loss = model.loss("reviews", outputs, batch["labels"])
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.task_parameters("reviews"))
    assert model.encoder.embeddings.word.weight.grad.abs().sum() > 0  # the shared encoder learns too
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.task_parameters("reviews")))
    with torch.no_grad():
        assert model.loss("reviews", model("reviews", batch), batch["labels"]) < loss
