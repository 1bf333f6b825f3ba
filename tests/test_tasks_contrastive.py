"""A corpus as a task of the multitask mixture: declared in YAML, no head, SimCSE's loss, a capped size."""
from __future__ import annotations

import pytest
import torch

from dist_minbert.config import ConfigError, load_config
from dist_minbert.contrastive.loss import simcse_loss
from dist_minbert.tasks.config import TaskConfig, encoding_for

CORPUS = {"kind": "contrastive", "corpus": "/data/shards/wiki1m", "head": "none", "text_columns": ["sentence"],
          "batch_size": 32, "size_cap": 20000}


def test_a_contrastive_task_loads_from_yaml_beside_the_builtins():
    cfg = load_config(None, ["tasks.wiki.kind=contrastive", "tasks.wiki.corpus=/data/shards/wiki1m",
                             "tasks.wiki.head=none", "tasks.wiki.size_cap=20000", "tasks.wiki.batch_size=32"])
    assert list(cfg.tasks) == ["sst", "qqp", "sts", "wiki"]
    wiki = cfg.tasks["wiki"]
    assert (wiki.kind, wiki.size_cap, wiki.temperature, encoding_for(wiki)) == ("contrastive", 20000, 0.05, "single")


@pytest.mark.parametrize("change, message", [
    ({"corpus": ""}, "corpus: empty with kind contrastive"),
    ({"train": "x.csv"}, "train / dev / test: 'x.csv'"),
    ({"head": "linear"}, "head: 'linear' with kind contrastive; allowed: 'none'"),
    ({"temperature": 0.0}, "size_cap / temperature / batch_size"),
    ({"num_classes": 2}, "num_classes / label_range"),
])
def test_a_contrastive_task_refuses_what_does_not_fit_it(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TaskConfig(**{**CORPUS, **change})


def test_corpus_settings_on_another_kind_are_refused():
    with pytest.raises(ConfigError, match="tasks.sst.corpus / size_cap: set with kind classification"):
        load_config(None, ["tasks.sst.corpus=/data/shards"])


def test_the_contrastive_loss_is_simcse_on_two_views_of_the_batch(tiny_checkpoint):
    from dist_minbert.model.checkpoint import load_encoder
    from dist_minbert.tasks.multitask import MultitaskModel
    from dist_minbert.tasks.pooling import POOLINGS

    torch.manual_seed(0)
    encoder = load_encoder(tiny_checkpoint, dropout=0.1)
    model = MultitaskModel(encoder, {"wiki": TaskConfig(**CORPUS)}, "mean")
    assert model.task_parameters("wiki") == []
    ids = torch.randint(1000, 2000, (4, 7))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    torch.manual_seed(1)
    loss = model.loss("wiki", model("wiki", batch), None)
    # The same dropout draws: one pass over the doubled batch, rows i and B + i are sentence i's two views.
    torch.manual_seed(1)
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    z = POOLINGS["mean"](encoder(doubled["input_ids"], doubled["attention_mask"], doubled["token_type_ids"]),
                         doubled["attention_mask"])
    assert torch.allclose(loss, simcse_loss(z[:4], z[4:], 0.05))
    assert not torch.equal(z[:4], z[4:])  # dropout made two different views
