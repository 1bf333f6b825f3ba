"""The progress bar where no terminal redraws it (a Ray worker's forwarded stderr): whole lines, few of them."""
from __future__ import annotations

import io

from dist_minbert.observe import progress
from dist_minbert.observe.progress import progress_bar


def test_off_a_terminal_each_refresh_is_its_own_line_and_log_lines_stay_apart(monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)
    stream = io.StringIO()
    bar = progress_bar(3, "train", stream=stream)
    for _ in range(3):
        bar.update(1)
        stream.write("step line\n")  # what a logger writes between two refreshes
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines.count("step line") == 3
    assert [line for line in lines if line != "step line"][-1].startswith("train: 100%")
    assert all(line == "step line" or line.startswith("train:") for line in lines)


def test_off_a_terminal_the_bar_refreshes_at_most_every_interval():
    stream = io.StringIO()
    bar = progress_bar(1000, "train", stream=stream)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    assert len(stream.getvalue().splitlines()) <= 3  # start, (maybe one refresh,) the final state


def test_disabled_prints_nothing():
    stream = io.StringIO()
    bar = progress_bar(3, "train", enabled=False, stream=stream)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""
