"""The SimCSE job end to end on 2 Ray Train workers: the engine's parts reused, STS zero-shot evaluation, the
best encoder exported as a `model.checkpoint`, and a resumed run equal to the uninterrupted one; those two
train under bf16 autocast (the GradCache runs in fp32), so the SimCSE job's autocast path runs end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.ray_workers import write_slice

pytestmark = pytest.mark.distributed

STEPS = 6
AUTOCAST = "deepspeed.precision=autocast_bf16"


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory, tiny_checkpoint, shared_data) -> Path:
    """200 SST training sentences, prepared into corpus shards with the tiny model's tokenizer."""
    from dist_minbert.cli import main

    folder = tmp_path_factory.mktemp("simcse_corpus")
    rows = write_slice(shared_data / "ids-sst-train.csv", folder / "sst.csv", 200).read_text().splitlines()[1:]
    (folder / "corpus.txt").write_text("".join(row.split("\t")[2] + "\n" for row in rows))
    assert main(["prepare", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "simcse.yaml"),
                 "--corpus", str(folder / "corpus.txt"), "--out", str(folder / "shards"),
                 f"model.checkpoint={tiny_checkpoint}", f"simcse.corpus={folder / 'shards'}"]) == 0
    return folder / "shards"


def _config(tiny_checkpoint, corpus_shards, shared_data, out: Path, *overrides: str):
    from dist_minbert.config import load_simcse_config

    repo = Path(__file__).resolve().parents[1]
    return load_simcse_config(repo / "configs" / "simcse.yaml", [
        f"model.checkpoint={tiny_checkpoint}", f"simcse.corpus={corpus_shards}", f"data.root={shared_data}",
        f"train.output_dir={out}", "simcse.batch_size_per_worker=8", "simcse.eval_every_steps=3",
        "optim.schedule=constant", "observe.log_every=1", "observe.progress=false", *overrides])


def _encoder_weights(folder: Path) -> torch.Tensor:
    from dist_minbert.model.checkpoint import load_encoder

    return torch.cat([p.detach().reshape(-1) for p in load_encoder(str(folder)).parameters()])


@pytest.fixture(scope="module")
def uninterrupted(ray_session, tmp_path_factory, tiny_checkpoint, corpus_shards, shared_data) -> dict:
    from launch.ray_run import run_simcse

    out = tmp_path_factory.mktemp("simcse_run")
    return run_simcse(_config(tiny_checkpoint, corpus_shards, shared_data, out, f"train.max_steps={STEPS}", AUTOCAST))


def test_simcse_trains_evaluates_and_exports_an_encoder_for_train(uninterrupted, tiny_checkpoint):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dist_minbert.config import load_config

    summary = uninterrupted
    assert summary["num_workers"] == 2 and summary["steps"] == STEPS and summary["samples"] == STEPS * 16
    for label in ("initial_dev", "best_dev", "dev"):
        assert set(summary[label]["sts"]) == {"pearson", "spearman", "alignment", "uniformity"}
    assert summary["best_score"] == summary["best_dev"]["sts"]["spearman"]
    events = EventAccumulator(summary["paths"]["tensorboard"])
    events.Reload()
    assert [e.step for e in events.Scalars("loss/simcse")] == list(range(1, STEPS + 1))
    assert [e.step for e in events.Scalars("dev/sts/spearman")] == [0, 3, 6]
    assert {"dev/sts/alignment", "dev/sts/uniformity", "time/data_s"} <= set(events.Tags()["scalars"])
    encoder = Path(summary["paths"]["encoder"])
    assert not torch.equal(_encoder_weights(encoder), _encoder_weights(Path(tiny_checkpoint)))  # it trained
    # The export is a model.checkpoint for multitask fine-tuning (the B3 row).
    assert load_config(None, [f"model.checkpoint={encoder}"]).model.checkpoint == str(encoder)


def test_simcse_writes_the_tags_runs_are_compared_by(uninterrupted):
    """lr, samples and tokens per second, the step-time split, peak memory and the HParams row, as the multitask
    job writes them (tests/test_observe_tensorboard.py); its own hparams are the SimCSE section's."""
    from dist_minbert.config import load_simcse_config
    from tests.test_observe_tensorboard import check_complete_run, logged_scalars

    summary = uninterrupted
    cfg = load_simcse_config(summary["paths"]["config"], [])
    tensorboard = summary["paths"]["tensorboard"]
    check_complete_run(logged_scalars(tensorboard), summary, tensorboard, num_workers=2,
                       max_tokens_per_sample=cfg.model.max_length,
                       hparams={"simcse.negatives": "global", "simcse.batch_size_per_worker": 8.0,
                                "workers.num_workers": 2.0, "steps": float(STEPS), "optim.schedule": "constant",
                                "deepspeed.precision": "autocast_bf16"})


def test_resumed_simcse_run_equals_the_uninterrupted_one(uninterrupted, tiny_checkpoint, corpus_shards,
                                                          shared_data, tmp_path):
    """Same workers, constant learning rate: 3 steps, a new launch resuming from `latest` for the other 3 —
    stream positions, RNG (dropout masks) and optimizer state carry over, so the weights match exactly."""
    from launch.ray_run import run_simcse

    out = tmp_path / "resumed"
    first = run_simcse(_config(tiny_checkpoint, corpus_shards, shared_data, out, "train.max_steps=3", AUTOCAST))
    assert first["steps"] == 3
    resumed = run_simcse(_config(tiny_checkpoint, corpus_shards, shared_data, out, f"train.max_steps={STEPS}",
                                 "checkpoint.resume=latest", AUTOCAST))
    assert resumed["steps"] == STEPS
    assert resumed["best_dev"] == uninterrupted["best_dev"]
    assert torch.equal(_encoder_weights(Path(resumed["paths"]["encoder"])),
                       _encoder_weights(Path(uninterrupted["paths"]["encoder"])))
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS


def test_a_simcse_run_exports_as_a_sentence_encoder_and_has_no_heads_to_evaluate(uninterrupted, tmp_path,
                                                                                  monkeypatch, capsys):
    """The trained encoder, with the embedding's pooling ([CLS] without the training MLP), through the real
    sentence-transformers library."""
    import huggingface_hub.constants
    from sentence_transformers import SentenceTransformer

    from dist_minbert.cli import main
    from dist_minbert.model.checkpoint import load_encoder
    from dist_minbert.model.tokenizer import WordPieceTokenizer
    from dist_minbert.tasks.sentence_embedding import embed_sentences

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run = uninterrupted["paths"]["output_dir"]
    assert main(["export", run, str(tmp_path / "st"), "--format", "sentence-transformers"]) == 0
    assert "cls pooling" in capsys.readouterr().out
    texts = ["A very funny movie.", "Two dogs are running through a field of tall grass.", "No."]
    encoder_dir = uninterrupted["paths"]["encoder"]
    ours = embed_sentences(load_encoder(encoder_dir, dropout=0.0), WordPieceTokenizer.from_checkpoint(encoder_dir),
                           texts, "cls", 32)
    theirs = SentenceTransformer(str(tmp_path / "st"), device="cpu", local_files_only=True).encode(
        texts, convert_to_tensor=True)
    assert (ours - theirs.cpu()).abs().max() < 1e-5

    assert main(["evaluate", run]) == 2
    assert "a SimCSE run has no task heads" in capsys.readouterr().err


def test_grad_cache_under_deepspeed_takes_the_uncached_steps(ray_session, tiny_checkpoint, corpus_shards,
                                                               shared_data, tmp_path):
    """The job with simcse.chunk_size (4 rows of each worker's 16-row doubled batch per forward) against the
    same job without: GradCache's parameter gradients reach DeepSpeed through the hand-over, and after one
    plain-SGD step (the update is lr × the gradient; Adam, or more steps, would blow rounding up) the encoders
    agree. Dropout 0
    here: with dropout, chunks draw other masks than one forward does."""
    from launch.ray_run import run_simcse

    ends = {}
    for chunk in (0, 4):
        out = tmp_path / f"chunk{chunk}"
        run_simcse(_config(tiny_checkpoint, corpus_shards, shared_data, out, "train.max_steps=1", "model.dropout=0.0",
                           "optim.name=sgd", "optim.lr=0.1",
                           f"simcse.chunk_size={chunk}", "simcse.eval_every_steps=0", "observe.tensorboard=false"))
        ends[chunk] = _encoder_weights(out / "encoder")
    start = _encoder_weights(Path(tiny_checkpoint))
    change = float((ends[0] - start).norm())
    assert change > 0
    # The gradients agree to ~1e-6 (tests/test_contrastive_grad_cache.py); the fp32 weights they update round
    # each changed entry to its own ulp, which on an update this small is ~2e-5 of it. A wrong cache is off by O(1).
    assert float((ends[4] - ends[0]).norm()) <= 1e-4 * change
