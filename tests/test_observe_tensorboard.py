"""The TensorBoard a user compares runs by: the pure pieces here (exclusive step timers, non-pad token counts, the
HParams rows as TensorBoard's own plugin lists them), and `check_complete_run`, which the 2-worker jobs of
test_cli_end_to_end.py (exact PCGrad) and test_engine_simcse.py apply to the event files they already write."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from dist_minbert.data.collate import collate
from dist_minbert.observe.loss_window import LossWindow, num_tokens
from dist_minbert.observe.memory import memory_scalars, peak_rss_mb
from dist_minbert.observe.metrics_logger import MetricsLogger
from dist_minbert.observe.run_figures import hparam_metrics
from dist_minbert.observe.timers import STEP_PHASES, StepTimers

PARTS = [phase for phase in STEP_PHASES if phase != "step"]


# -- what the jobs' tests check on their runs ----------------------------------------------------------------------

def check_complete_run(scalars: dict[str, dict[int, float]], summary: dict, tensorboard: str, *, num_workers: int,
                       max_tokens_per_sample: int, hparams: dict[str, object]) -> None:
    """The tags every job writes at each log step (log_every=1 here), with plausible values, and the run's HParams
    row with its final metrics. `max_tokens_per_sample`: max_length times the sentences a sample holds."""
    steps = sorted(scalars["throughput/samples_per_s"])
    assert steps == list(range(1, summary["steps"] + 1))
    for tag in ["lr", "throughput/tokens_per_s", "memory/peak_rss_mb/max",
                *[f"memory/peak_rss_mb/rank{r}" for r in range(num_workers)], *[f"time/{p}_s" for p in STEP_PHASES]]:
        assert sorted(scalars[tag]) == steps, tag
    assert not [tag for tag in scalars if tag.startswith("memory/gpu_peak_mb/")]  # CPU workers
    for step in steps:
        samples_per_s, tokens_per_s = scalars["throughput/samples_per_s"][step], scalars["throughput/tokens_per_s"][step]
        assert 0 < tokens_per_s <= samples_per_s * max_tokens_per_sample, step
        # Each phase inside the step, none twice: never more than the step (float32 in the event file).
        assert sum(scalars[f"time/{p}_s"][step] for p in PARTS) <= scalars["time/step_s"][step] * (1 + 1e-5), step
        ranks = [scalars[f"memory/peak_rss_mb/rank{r}"][step] for r in range(num_workers)]
        assert min(ranks) > 50 and scalars["memory/peak_rss_mb/max"][step] == max(ranks)  # torch alone is more
    # Within 10% over the logged steps (a step of tens of ms on the tiny model can lose a scheduler slice of a
    # loaded machine outside its phases: checked over the run rather than step by step).
    parts = sum(scalars[f"time/{p}_s"][step] for p in PARTS for step in steps)
    assert parts == pytest.approx(sum(scalars["time/step_s"].values()), rel=0.10)
    # summary.json: the same figures over the run.
    split = summary["step_time_s"]
    assert list(split) == list(STEP_PHASES) and min(split[p] for p in ("forward_backward", "optimizer")) > 0
    assert sum(split[p] for p in PARTS) == pytest.approx(split["step"], rel=0.10)
    assert 0 < summary["tokens_per_s"] <= summary["samples_per_s"] * max_tokens_per_sample
    assert summary["peak_rss_mb"] >= max(scalars["memory/peak_rss_mb/max"].values())  # a peak only grows
    # The HParams row: this run's folder itself, its hparams and its final metrics.
    [row] = hparams_rows(Path(tensorboard).parent)
    assert row["run"] == Path(tensorboard).name
    assert {k: row["hparams"][k] for k in hparams} == hparams
    assert row["metrics"]["hparams/best_score"] == pytest.approx(summary["best_score"], rel=1e-6)
    for task, metrics in summary["best_dev"].items():
        for name, value in metrics.items():
            if value is not None:
                assert row["metrics"][f"hparams/best_dev/{task}/{name}"] == pytest.approx(value, rel=1e-6, abs=1e-7)
    assert row["metrics"]["hparams/tokens_per_s"] == pytest.approx(summary["tokens_per_s"], rel=1e-6)


def logged_scalars(folder: str) -> dict[str, dict[int, float]]:
    """tag → step → value of every scalar in a TensorBoard folder, read as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(folder, size_guidance={"scalars": 0})  # 0 = keep every event
    accumulator.Reload()
    return {tag: {event.step: event.value for event in accumulator.Scalars(tag)}
            for tag in accumulator.Tags()["scalars"]}


def hparams_rows(logdir: Path) -> list[dict]:
    """The HParams view's rows for `tensorboard --logdir logdir`, computed by TensorBoard's hparams plugin itself:
    each row's session (run) name relative to logdir, its hparams and its metric columns' values."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                               data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)))
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, allowed_statuses=[
        api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING])
    response = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run()
    rows = []
    for group in response.session_groups:
        hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in group.hparams.items()}
        rows.append({"run": group.name, "sessions": [s.name for s in group.sessions], "hparams": hparams,
                     "metrics": {m.name.tag: m.value for m in group.metric_values}})
    return sorted(rows, key=lambda row: row["run"])


# -- the pure pieces -----------------------------------------------------------------------------------------------

def test_a_nested_phase_is_taken_out_of_the_enclosing_one():
    """surgery sleeps 10 ms around 50 ms of communication: communication counts its 50 ms, surgery only the rest,
    so the two add up to the block's wall time (bracketed by this test's own clock, load or not); counted twice,
    they would exceed it by the 50 ms. Means are per step: two steps, each its own bracket."""
    timers = StepTimers()
    walls = []
    for _ in range(2):
        started = time.perf_counter()
        with timers.phase("surgery"):
            time.sleep(0.01)
            with timers.phase("communication"):
                time.sleep(0.05)
        with timers.phase("optimizer"):
            time.sleep(0.01)
        walls.append(time.perf_counter() - started)
        timers.end_step(walls[-1])
    window, run = timers.drain(), timers.run_means()
    assert window["time/communication_s"] >= 0.05 and window["time/surgery_s"] >= 0.01
    parts = window["time/surgery_s"] + window["time/communication_s"] + window["time/optimizer_s"]
    assert 0.07 <= parts <= window["time/step_s"] == pytest.approx(sum(walls) / 2)
    assert {p: run[p] for p in ("surgery", "communication", "optimizer", "step")} == pytest.approx(
        {p: window[f"time/{p}_s"] for p in ("surgery", "communication", "optimizer", "step")})
    assert run["data"] == 0.0 and run["forward_backward"] == 0.0
    assert set(timers.drain().values()) == {0.0}  # drained


def test_tokens_are_the_attention_masks_of_every_sentence():
    """Worked by hand: [CLS] x [SEP] per sentence. single, rows of 3 and 1 ids: 5 + 3 = 8 real tokens of the 2×5
    padded. bi, pairs (3, 2) and (1, 4): a side 5 + 3, b side 4 + 6 = 18. cross, (3, 2) and (1, 4):
    [CLS] a [SEP] b [SEP] = 8 and 8 = 16, and with max_length 6 both pairs are cut to 6: 12."""
    a, b = [[11, 12, 13], [14]], [[21, 22], [23, 24, 25, 26]]

    def batch(encoding: str, max_length: int = 32):
        rows = {"a": a} if encoding == "single" else {"a": a, "b": b}
        return collate(rows, encoding, max_length, cls_id=101, sep_id=102, pad_id=0)

    assert num_tokens([{"sst": batch("single")}]) == 8
    assert num_tokens([{"sts": batch("bi")}]) == 18
    assert num_tokens([{"qqp": batch("cross")}]) == 16
    assert num_tokens([{"qqp": batch("cross", max_length=6)}]) == 12
    # A step of two micro-batches over two tasks: every batch counts.
    assert num_tokens([{"sst": batch("single"), "sts": batch("bi")}, {"sst": batch("single")}]) == 8 + 18 + 8


def test_the_window_reports_tokens_and_samples_per_second_and_keeps_the_run_total():
    window = LossWindow()
    window.add({"sst": 0.5}, samples=8, tokens=100, seconds=0.5)
    window.add({"sst": 1.5, "sts": 2.0}, samples=16, tokens=300, seconds=1.5)
    assert window.drain() == {"loss/sst": 1.0, "loss/sts": 2.0, "throughput/samples_per_s": 12.0,
                              "throughput/tokens_per_s": 200.0}
    window.add({}, samples=0, tokens=0, seconds=1.0)  # a skipped step: time, no samples
    assert window.drain()["throughput/tokens_per_s"] == 0.0
    assert window.run_tokens == 400


def test_memory_scalars_of_one_process():
    values = memory_scalars("cpu")
    assert set(values) == {"memory/peak_rss_mb/rank0", "memory/peak_rss_mb/max"}
    assert 50 < values["memory/peak_rss_mb/max"] == values["memory/peak_rss_mb/rank0"] <= peak_rss_mb()


def test_hparam_metrics_leave_out_what_a_run_has_no_value_for():
    summary = {"dev": {"sst": {"accuracy": 0.5}, "sts": {"pearson": None}}, "best_dev": {"sst": {"accuracy": 0.75}},
               "best_score": math.nan, "samples_per_s": 10.0, "tokens_per_s": 100.0, "peak_rss_mb": 700.0,
               "step_time_s": {"step": 0.25}}
    assert hparam_metrics(summary) == {"hparams/dev/sst/accuracy": 0.5, "hparams/best_dev/sst/accuracy": 0.75,
                                       "hparams/samples_per_s": 10.0, "hparams/tokens_per_s": 100.0,
                                       "hparams/peak_rss_mb": 700.0, "hparams/step_s": 0.25}


def test_each_run_is_one_row_of_the_hparams_view(tmp_path):
    """Two runs under one logdir, as `tensorboard --logdir runs/` sees them: one row each, named by the run's own
    folder (torch's add_hparams would add a second run, `<run>/tensorboard/<name>`, holding the row), with the
    run's hparams and the last value of each metric."""
    for name, mode, score in (("baseline", "sum", 0.5), ("pcgrad", "pcgrad", 0.625)):
        logger = MetricsLogger(str(tmp_path / name / "tensorboard"))
        logger.scalars(1, {"loss/sst": 1.0})
        logger.hparams(3, {"surgery.mode": mode, "optim.lr": 1e-3, "workers.num_workers": 2},
                       {"hparams/best_score": score})
        logger.close()
    rows = hparams_rows(tmp_path)
    assert [(row["run"], row["sessions"]) for row in rows] == [("baseline/tensorboard", ["baseline/tensorboard"]),
                                                               ("pcgrad/tensorboard", ["pcgrad/tensorboard"])]
    assert [row["hparams"] for row in rows] == [
        {"surgery.mode": mode, "optim.lr": 1e-3, "workers.num_workers": 2.0} for mode in ("sum", "pcgrad")]
    assert [row["metrics"] for row in rows] == [{"hparams/best_score": 0.5}, {"hparams/best_score": 0.625}]
    assert sorted(p.name for p in (tmp_path / "baseline" / "tensorboard").iterdir() if p.is_dir()) == []
