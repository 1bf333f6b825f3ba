"""`dist-minbert scale`: the projection's cost model against hand calculations, the CSV, plot and TensorBoard
writers on hand-built rows, and one lean end-to-end run (1 and 2 workers, 2 steps each, the tiny BERT).

Hand calculation of a projected step (P = 1e8 parameters of 4 bytes = 4e8 bytes, n = 4 workers, β = 20 GB/s,
α = 15 µs, global batch 64, 1 ms of compute per sample):
  one ring all-reduce of P: 2·3/4 · 4e8 / 20e9 + 2·3 · 15e-6 = 0.03 + 9e-5 = 0.03009 s
  small collectives (3, sample counts, finite flag, clipping norm): 3 · 2·3 · 15e-6 = 2.7e-4 s
  exact PCGrad, allreduce plan, T = 3: 3 all-reduces → 3 · 0.03009 + 2.7e-4 = 0.09054 s
  compute: 1e-3 · 64/4 = 0.016 s; step 0.10654 s; 64 / 0.10654 = 600.7 samples/s
  one worker: 64 samples in 0.064 s = 1000 samples/s → efficiency 600.7 / (4 · 1000) = 0.1502
  sharded plan: 3 reduce-scatters + 1 all-gather = 2 units, and the Gram matrix is a 4th small collective:
  2 · 0.03009 + 4 · 9e-5 = 0.06054 s
"""
from __future__ import annotations

import csv
import json

import pytest
import yaml

from dist_minbert.bench import scale_report
from dist_minbert.bench.scaling_model import Network, comm_s, encoder_size, plan_collectives, plan_units, project
from dist_minbert.cli import main
from dist_minbert.surgery.comm import CommCounter
from tests.ray_workers import write_slice

NETWORK = Network(bandwidth_gb_s=20.0, latency_us=15.0)
P = 100_000_000


@pytest.mark.parametrize("mode,plan,backend,expected", [
    ("sum", "auto", "nccl", {"all_reduce": 1}),
    ("pcgrad_local", "auto", "nccl", {"all_reduce": 1}),
    ("pcgrad", "allreduce", "nccl", {"all_reduce": 3}),
    ("pcgrad", "auto", "gloo", {"all_reduce": 3}),  # auto is allreduce on gloo, sharded elsewhere
    ("pcgrad", "auto", "nccl", {"reduce_scatter": 3, "all_gather": 1}),
    ("pcgrad", "sharded", "gloo", {"reduce_scatter": 3, "all_gather": 1}),
])
def test_plan_collectives_are_the_engines(mode, plan, backend, expected):
    assert plan_collectives(mode, plan, 3, backend) == expected


def test_plan_units_are_surgery_comms():
    # The units bench pcgrad counts on the real plans: 1, T and (T+1)/2 (tests/test_bench_pcgrad.py).
    counter = CommCounter(num_params=10)
    for collective, count in {"reduce_scatter": 3, "all_gather": 1}.items():
        for _ in range(count):
            counter.record(collective, 10)
    assert plan_units({"reduce_scatter": 3, "all_gather": 1}) == counter.units == 2.0
    assert plan_units({"all_reduce": 3}) == 3.0 and plan_units({"all_reduce": 1}) == 1.0


def test_communication_by_hand():
    assert comm_s(1, P, {"all_reduce": 3}, NETWORK) == 0.0
    assert comm_s(4, P, {"all_reduce": 3}, NETWORK) == pytest.approx(3 * 0.03009 + 2.7e-4)
    assert comm_s(4, P, {"reduce_scatter": 3, "all_gather": 1}, NETWORK) == pytest.approx(2 * 0.03009 + 4 * 9e-5)
    bf16 = Network(bandwidth_gb_s=20.0, latency_us=15.0, gradient_bytes=2)  # half the bytes, the same hops
    assert comm_s(4, P, {"all_reduce": 1}, bf16) == pytest.approx(0.015 + 9e-5 + 2.7e-4)


def test_projection_by_hand():
    one, four = project([1, 4], 64, 1e-3, P, {"all_reduce": 3}, NETWORK)
    assert one == pytest.approx({"kind": "projection", "workers": 1, "num_params": P, "samples_per_s": 1000.0,
                                 "efficiency": 1.0, "step_s": 0.064, "compute_s": 0.064, "communication_s": 0.0})
    assert four["compute_s"] == pytest.approx(0.016) and four["communication_s"] == pytest.approx(0.09054)
    assert four["step_s"] == pytest.approx(0.10654)
    assert four["samples_per_s"] == pytest.approx(64 / 0.10654)
    assert four["efficiency"] == pytest.approx(64 / 0.10654 / 4000)


def test_projection_refuses_more_workers_than_samples():
    with pytest.raises(ValueError, match=r"project workers: \[128\] outside 1..64"):
        project([8, 128], 64, 1e-3, P, {"all_reduce": 1}, NETWORK)
    with pytest.raises(ValueError, match="bandwidth_gb_s"):
        Network(bandwidth_gb_s=0.0)


def test_named_sizes_count_hugging_faces_parameters():
    # BertModel's own counts (embeddings, 12 or 24 blocks, pooler) as Hugging Face reports them.
    assert encoder_size("bert-base")[1] == 109_482_240
    assert encoder_size("bert-large")[1] == 335_141_888


# -- the writers, on hand-built rows ---------------------------------------------------------------------------------
def measured(workers: int, rate: float) -> dict:
    return {"kind": "measured", "workers": workers, "global_batch": 24.0, "samples_per_s": rate, "tokens_per_s": None,
            "step_s": 24 / rate, "data_s": 0.01, "communication_s": 0.02 * (workers > 1), "compute_s": 0.5,
            "peak_rss_mb": 900.0}


def test_efficiency_is_against_the_fewest_workers():
    rows = scale_report.add_efficiency([measured(1, 10.0), measured(2, 15.0)])
    assert [r["efficiency"] for r in rows] == [1.0, 0.75]  # 15 / (2 · 10)
    rows = scale_report.add_efficiency([measured(2, 16.0), measured(4, 24.0)])
    assert [r["efficiency"] for r in rows] == [1.0, 0.75]  # (24 / 4) / (16 / 2)
    assert scale_report.compute_s_per_sample({"compute_s": 0.5, "workers": 2, "global_batch": 24}) == 0.5 * 2 / 24


def test_csv_plot_and_tensorboard_writers(tmp_path):
    rows = scale_report.add_efficiency([measured(1, 10.0), measured(2, 15.0)])
    rows += project([1, 4, 8], 24, 0.1, P, {"all_reduce": 3}, NETWORK)
    scale_report.write_csv(rows, tmp_path / "scaling.csv")
    with open(tmp_path / "scaling.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["kind"], r["workers"]) for r in table] == [("measured", "1"), ("measured", "2"), ("projection", "1"),
                                                         ("projection", "4"), ("projection", "8")]
    assert float(table[1]["efficiency"]) == 0.75 and table[1]["tokens_per_s"] == "" and table[2]["peak_rss_mb"] == ""
    scale_report.plot(rows, tmp_path / "scaling.png", "bert-base, 20 GB/s")
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scale_report.write_tensorboard(rows, tmp_path / "tb")
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["summary", "workers-1", "workers-2"]
    summary = scale_report.read_scalars(tmp_path / "tb" / "summary")
    assert summary["scale/efficiency"] == [(1, 1.0), (2, 0.75)]
    assert [step for step, _ in summary["projection/samples_per_s"]] == [1, 4, 8]
    assert summary["projection/samples_per_s"][1][1] == pytest.approx(rows[3]["samples_per_s"])
    assert "projection/samples_per_s" not in scale_report.read_scalars(tmp_path / "tb" / "workers-2")


# -- end to end ------------------------------------------------------------------------------------------------------
@pytest.mark.distributed
def test_scale_on_1_and_2_workers(ray_session, tiny_checkpoint, shared_data, tmp_path):
    """`dist-minbert scale --workers 1,2 --steps 2`: a run per size (same global batches), the CSV's rows, a PNG,
    TensorBoard runs per size and the summary run, the projection labelled."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("ids-sst-train.csv", "ids-sst-dev.csv", "quora-train.csv", "quora-dev.csv", "sts-train.csv",
                 "sts-dev.csv"):
        write_slice(shared_data / name, data / name, 32)
    config = {"model": {"checkpoint": tiny_checkpoint, "max_length": 32, "dropout": 0.0},
              "tasks": {"sst": {"head": "linear", "batch_size": 8, "test": ""},
                        "qqp": {"head": "bi_mlp", "batch_size": 8},
                        "sts": {"head": "bi_cosine", "batch_size": 8, "test": ""}},
              "data": {"root": str(data)}, "surgery": {"mode": "pcgrad"},
              "train": {"output_dir": str(tmp_path / "unused"), "predict_splits": ["dev"]}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "scale"
    assert main(["scale", "--config", str(tmp_path / "job.yaml"), "--workers", "1,2", "--steps", "2", "--out", str(out),
                 "--project", "--model-size", "bert-base", "--project-workers", "4,8", "--compute-speedup", "2"]) == 0

    with open(out / "scaling.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["kind"], int(r["workers"])) for r in table] == [("measured", 1), ("measured", 2), ("projection", 1),
                                                              ("projection", 4), ("projection", 8)]
    one, two = table[0], table[1]
    assert float(one["global_batch"]) == float(two["global_batch"]) == 24  # 3 tasks × 8, whatever the workers
    assert float(one["efficiency"]) == 1.0
    assert float(two["efficiency"]) == pytest.approx(float(two["samples_per_s"]) / (2 * float(one["samples_per_s"])))
    for row in table:
        assert float(row["samples_per_s"]) > 0 and float(row["step_s"]) > 0
    assert all(int(r["num_params"]) == 109_482_240 for r in table[2:])  # bert-base, as asked
    for n in (1, 2):
        summary = json.loads((out / f"workers-{n}" / "summary.json").read_text())
        assert summary["num_workers"] == n and summary["steps"] == 2 and summary["samples"] == 2 * 24
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {p.name: scale_report.read_scalars(p) for p in (out / "tensorboard").iterdir()}
    assert sorted(runs) == ["summary", "workers-1", "workers-2"]
    assert [step for step, _ in runs["summary"]["scale/samples_per_s"]] == [1, 2]
    assert [step for step, _ in runs["summary"]["projection/efficiency"]] == [1, 4, 8]
    assert runs["workers-2"]["scale/efficiency"] == [(2, pytest.approx(float(two["efficiency"]), rel=1e-6))]
    result = json.loads((out / "scaling.json").read_text())
    assert result["projection"]["label"] == "projection" and result["projection"]["overlap"] is False
    assert result["projection"]["collectives"] == {"reduce_scatter": 3, "all_gather": 1}  # exact PCGrad on NCCL
    # bert-base's compute per sample: the 1-worker run's compute per sample × the FLOP ratio / the speed-up;
    # its projected 1-worker step is that × the global batch, with no communication.
    projected = result["projection"]
    per_sample = float(one["compute_s"]) / 24 * projected["flops_ratio"] / 2
    assert projected["compute_s_per_sample"] == pytest.approx(per_sample, rel=1e-6)
    assert float(table[2]["step_s"]) == pytest.approx(24 * per_sample, rel=1e-6) and projected["flops_ratio"] > 1


@pytest.mark.distributed
def test_scale_refuses_what_it_cannot_measure(ray_session, tmp_path, capsys):
    """Before any run: a group larger than Ray's CPUs (it would wait forever), a count that does not divide the
    global batches, and an output folder that holds earlier event files."""
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"tasks": {"sst": {"batch_size": 8}}}))
    config = ["scale", "--config", str(tmp_path / "job.yaml"), "--out"]
    assert main([*config, str(tmp_path / "a"), "--workers", "1,4"]) == 2
    assert "--workers: [4] need more CPUs than Ray has (2" in capsys.readouterr().err
    assert main([*config, str(tmp_path / "b"), "--workers", "1,3"]) == 2
    assert "batch_size" in capsys.readouterr().err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "events").write_text("")
    assert main([*config, str(tmp_path / "c"), "--workers", "1,2"]) == 2
    assert "is not empty" in capsys.readouterr().err
