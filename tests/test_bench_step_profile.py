"""benchmarks/step_profile.py: every --only section runs to the end on small inputs (its timings are not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dist_minbert.tasks.registry import BUILTIN_TASKS
from tests.ray_workers import write_slice

REPO = Path(__file__).resolve().parents[1]
NUM_ROWS = 48

# One process for all sections (torch, DeepSpeed and transformers load once); each section is its own main() call,
# as `--only SECTION` runs it. The step section builds a one-rank gloo group, hence not in the pytest process.
_EACH_SECTION = """
import runpy, sys
profile = runpy.run_path(sys.argv[1])
for section in profile["SECTIONS"]:
    print(f"== {section}", flush=True)
    profile["main"](["--only", section, *sys.argv[2:]])
"""


def test_every_section_runs_on_single_bi_and_cross_batches(tiny_checkpoint, shared_data, tmp_path):
    for task in BUILTIN_TASKS.values():
        for split in ("train", "dev"):
            write_slice(shared_data / task[split], tmp_path / task[split], NUM_ROWS)
    overrides = [f"model.checkpoint={tiny_checkpoint}", f"data.root={tmp_path}", "model.max_length=32",
                 "tasks.sst.batch_size=8", "tasks.qqp.batch_size=8", "tasks.sts.batch_size=8",
                 "tasks.qqp.head=cross"]  # demo.yaml's sst: single, sts: bi; qqp as a cross-encoder covers the third
    run = subprocess.run([sys.executable, "-c", _EACH_SECTION, str(REPO / "benchmarks" / "step_profile.py"),
                          "--config", str(REPO / "configs" / "demo.yaml"), "--reps", "1", "--set", *overrides],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    sections = run.stdout.split("== ")[1:]
    assert [s.split("\n", 1)[0] for s in sections] == ["encoder", "attention", "dropout", "heads", "optimizer",
                                                       "step", "evaluation"]
    assert all(s.count("\n-- ") == 2 for s in sections)  # the data path's rows, then the section's own
