"""`dist-minbert corpus`: task sentences de-duplicated with eval text left out, generated lines, the command."""

from __future__ import annotations

import gzip
import uuid
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from dist_minbert.cli import main
from dist_minbert.data.config import DataConfig
from dist_minbert.data.corpus import generated_lines, normalise_whitespace, task_corpus, write_lines
from dist_minbert.data.shards import open_source
from dist_minbert.tasks.config import TaskConfig
from dist_minbert.tasks.readers import read_task_file
from dist_minbert.tasks.registry import BUILTIN_TASKS

REPO = Path(__file__).resolve().parents[1]


def write_cs224n(path: Path, columns: dict[str, list]) -> None:
    """A file as the course ships them: tab-separated, header line, leading index column, pandas quoting."""
    pd.DataFrame(columns).to_csv(path, sep="\t")


def small_data(root: Path, *, sst_train: list[str], sst_dev: list[str] = (), sts_test: list[tuple[str, str]] = (),
               qqp_train: list[tuple[str, str]] = (), qqp_dev: list[tuple[str, str]] = ()) -> Path:
    """Every builtin task file under `root`, holding the given texts (the others one filler row each)."""
    def single(texts, labelled=True):
        texts = list(texts) or ["filler single"]
        return {"id": [f"s{i}" for i in range(len(texts))], "sentence": texts,
                **({"sentiment": [1] * len(texts)} if labelled else {})}

    def pairs(rows, label, prefix):
        rows = list(rows) or [(f"filler {prefix} one", f"filler {prefix} two")]
        return {"id": [f"p{i}" for i in range(len(rows))], "sentence1": [a for a, _ in rows],
                "sentence2": [b for _, b in rows], **({label: [1.0] * len(rows)} if label else {})}

    root.mkdir(parents=True, exist_ok=True)
    write_cs224n(root / "ids-sst-train.csv", single(sst_train))
    write_cs224n(root / "ids-sst-dev.csv", single(sst_dev))
    write_cs224n(root / "ids-sst-test-student.csv", single(["filler sst test"], labelled=False))
    write_cs224n(root / "quora-train.csv", pairs(qqp_train, "is_duplicate", "qqp train"))
    write_cs224n(root / "quora-dev.csv", pairs(qqp_dev, "is_duplicate", "qqp dev"))
    write_cs224n(root / "sts-train.csv", pairs([("filler sts train a", "filler sts train b")], "similarity", ""))
    write_cs224n(root / "sts-dev.csv", pairs([], "similarity", "sts dev"))
    write_cs224n(root / "sts-test-student.csv", pairs(sts_test, None, "sts test"))
    return root


# -- the task corpus --------------------------------------------------------------------------------------------

def test_duplicates_after_whitespace_normalisation_are_dropped_first_occurrence_kept(tmp_path):
    root = small_data(tmp_path, sst_train=["A  good\tfilm .", "Second one.", "A good film .", " a good film ."],
                      qqp_train=[("Second one.", "Why  is it?"), ("Why is it?", "New question?")])
    corpus = task_corpus(DataConfig(root=str(root)))
    # File order: SST rows, then each QQP row's first and second text, then STS; case is kept ("a good film .").
    assert corpus.sentences == ["A good film .", "Second one.", "a good film .", "Why is it?", "New question?",
                                "filler sts train a", "filler sts train b"]
    assert corpus.num_read == 4 + 4 + 2
    assert corpus.num_duplicates == 3  # "A good film .", "Second one." (in QQP), "Why is it?"
    assert corpus.num_held_out == 0 and corpus.num_rejected_rows == 0


def test_a_sentence_of_any_dev_or_test_file_is_left_out_of_the_corpus(tmp_path):
    root = small_data(tmp_path,
                      sst_train=["Kept sentence.", "An SST dev sentence.", "A QQP dev question?", "An STS test text."],
                      sst_dev=["An  SST dev sentence."],  # differs from the train text in whitespace only
                      qqp_train=[("A QQP dev question?", "Also kept?")],
                      qqp_dev=[("Unrelated?", "A QQP dev question?")],
                      sts_test=[("An STS test text.", "Other.")])
    corpus = task_corpus(DataConfig(root=str(root)))
    assert "Kept sentence." in corpus.sentences and "Also kept?" in corpus.sentences
    for eval_text in ("An SST dev sentence.", "A QQP dev question?", "An STS test text."):
        assert eval_text not in corpus.sentences
    assert corpus.num_held_out == 3  # distinct sentences: the QQP question counts once, though read twice
    assert len(corpus.eval_files) == 5  # SST dev + test, QQP dev, STS dev + test


def test_the_shared_data_corpus_holds_no_dev_or_test_sentence(shared_data):
    data = DataConfig(root=str(shared_data))
    corpus = task_corpus(data)
    assert corpus.sentences == task_corpus(data).sentences  # deterministic
    assert 40_000 < len(corpus.sentences) < 50_000 and len(set(corpus.sentences)) == len(corpus.sentences)
    eval_texts, train_texts = set(), set()
    for raw in BUILTIN_TASKS.values():
        task = TaskConfig(**raw)
        for split, texts in (("train", train_texts), ("dev", eval_texts), ("test", eval_texts)):
            if getattr(task, split):
                rows = read_task_file(str(shared_data / getattr(task, split)), task, False, "reject")
                texts.update(normalise_whitespace(t) for t in rows.a + (rows.b or []))
    assert len(eval_texts) > 10_000
    assert not set(corpus.sentences) & eval_texts
    assert set(corpus.sentences) == train_texts - eval_texts
    assert corpus.num_held_out == len(train_texts & eval_texts) > 0
    assert corpus.num_read - corpus.num_duplicates == len(train_texts)


# -- generated lines --------------------------------------------------------------------------------------------

def test_generated_lines_are_distinct_joins_of_two_or_three_corpus_sentences(shared_data):
    sentences = task_corpus(DataConfig(root=str(shared_data))).sentences
    lines = list(generated_lines(sentences, 150_000))
    assert len(lines) == len(set(lines)) == 150_000
    n = len(sentences)
    assert lines[1] == f"{sentences[1]} {sentences[2]}"
    assert lines[0] == f"{sentences[0]} {sentences[1]} {sentences[3]}"  # every third line: one more, (7k + 3) mod n
    k = n + 1 if (n + 1) % 3 else n + 2
    assert lines[k] == f"{sentences[k - n]} {sentences[k - n + 2]}"  # the second pass pairs sentences 2 apart
    assert lines[:1000] == list(generated_lines(sentences, 1000))  # a prefix of the same order


def test_generated_lines_skip_a_join_that_repeats_an_earlier_line():
    # n = 4: candidate 2 joins sentences 2 and 3 ("a b" + "a"), candidate 7 sentences 3 and 1 ("a" + "b a"):
    # two distinct pairs, one text "a b a". The 12 candidates hold 11 distinct lines.
    sentences = ["z", "b a", "a b", "a"]
    candidates = _candidates(sentences)
    assert candidates[2] == candidates[7] == "a b a" and len(set(candidates)) == 11
    lines = list(generated_lines(sentences, 11))
    assert lines == candidates[:7] + candidates[8:]
    with pytest.raises(ValueError, match="exceeds the 11 distinct lines"):
        list(generated_lines(sentences, 12))


def _candidates(sentences: list[str]) -> list[str]:
    n = len(sentences)
    out = []
    for k in range(n * (n - 1)):
        line = f"{sentences[k % n]} {sentences[(k % n + 1 + k // n) % n]}"
        out.append(f"{line} {sentences[(7 * k + 3) % n]}" if k % 3 == 0 else line)
    return out


def test_write_lines_to_a_url_compresses_by_extension_and_leaves_no_temporary():
    fs = fsspec.filesystem("memory")
    root = f"/corpus-{uuid.uuid4().hex}"
    try:
        assert write_lines(f"memory://{root}/out/lines.txt.gz", ["one", "two\n", "three"]) == 3
        assert fs.ls(f"{root}/out", detail=False) == [f"{root}/out/lines.txt.gz"]
        assert gzip.decompress(fs.cat_file(f"{root}/out/lines.txt.gz")) == b"one\ntwo\nthree\n"
    finally:
        fs.rm(root, recursive=True)


# -- the command ------------------------------------------------------------------------------------------------

def test_corpus_command_writes_the_shared_corpus_and_prepare_shards_it(shared_data, tmp_path, capsys):
    out = tmp_path / "corpus" / "tasks.txt"
    assert main(["corpus", "--from-tasks", "--out", str(out), f"data.root={shared_data}"]) == 0
    printed = capsys.readouterr().out
    lines = out.read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""  # newline-terminated
    corpus = task_corpus(DataConfig(root=str(shared_data)))
    assert lines == corpus.sentences
    assert (f"{corpus.num_read} read from 3 train files, {corpus.num_duplicates} duplicates dropped, "
            f"{corpus.num_held_out} held out as eval text") in printed
    assert f"{len(lines)} sentences written → {out}" in printed

    shards = tmp_path / "shards"
    assert main(["prepare", "--config", str(REPO / "configs" / "demo.yaml"), "--corpus", str(out), "--out", str(shards),
                 "data.prepare_engine=local", "data.prepare_workers=1"]) == 0
    assert f"{len(lines)} rows" in capsys.readouterr().out
    source = open_source(str(shards))
    assert len(source) == len(lines)  # every sentence a row: none empty, too long or bad UTF-8


def test_corpus_command_generates_n_distinct_lines(tmp_path, capsys):
    root = small_data(tmp_path / "data", sst_train=[f"Sentence number {i}." for i in range(20)])
    out = tmp_path / "generated.txt"
    assert main(["corpus", "--generated", "300", "--out", str(out), f"data.root={root}"]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == len(set(lines)) == 300
    assert f"300 generated lines written → {out}" in capsys.readouterr().out


def test_sources_are_exclusive():
    with pytest.raises(SystemExit):
        main(["corpus", "--from-tasks", "--generated", "5", "--out", "x.txt"])


@pytest.mark.parametrize("damage", ["missing file", "missing column", "bad row"])
def test_bad_input_stops_with_the_file_named(tmp_path, capsys, damage):
    root = small_data(tmp_path / "data", sst_train=["Fine."])
    overrides = [f"data.root={root}"]
    if damage == "missing file":
        bad = root / "sts-dev.csv"
        bad.unlink()
    elif damage == "missing column":
        bad = root / "quora-dev.csv"
        write_cs224n(bad, {"id": ["p0"], "question1": ["Why?"], "sentence2": ["No."]})
    else:
        bad = root / "ids-sst-train.csv"
        bad.write_text(bad.read_text() + "7\ts7\tan extra field\t1\toops\n")
        overrides.append("data.on_bad_row=error")
    out = tmp_path / "corpus.txt"
    assert main(["corpus", "--out", str(out), *overrides]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err, err
    assert {"missing file": "No such file", "missing column": "column 'sentence1' missing",
            "bad row": f"{bad}:3: column_count"}[damage] in err
    assert not out.exists() and list(tmp_path.glob("corpus*")) == []
