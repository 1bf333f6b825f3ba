"""Two Ray nodes on this machine (two `ray start` processes of one CPU each): where a 2-worker run's ranks go,
where its files land, and what happens when the node of a non-head rank goes away mid-run.

The run is test_engine_checkpoint's (12 steps, a checkpoint every 2, ZeRO-1), started by `dist-minbert train`
in a process of its own with RAY_ADDRESS naming the cluster (this test process holds the session's own local
Ray instance). When the run has committed its step-2 checkpoint, the test SIGKILLs the second node's whole
process group (raylet, object store, the rank-1 worker) and starts a replacement node; Ray Train restarts
the group there and the run continues from its latest checkpoint.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from dist_minbert.engine import checkpointing
from tests.ray_cluster import BIN, ray_cluster
from tests.test_engine_checkpoint import (NUM_STEPS, assert_continues, data_slices, logged_attempts, reference_run,
                                          run_config)

pytestmark = pytest.mark.distributed

KILL_AFTER_CHECKPOINT = 2


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster(head_cpus=1) as two_nodes:
        two_nodes.add_node("node1", 1)
        yield two_nodes


def train_workers(cluster) -> list[dict]:
    """Ray Train's worker actors in the cluster, dead or alive: node_id, state, …"""
    out = cluster.ray("list", "actors", "--address", cluster.dashboard_url, "--format", "json", "--detail",
                      "--filter", "class_name=RayTrainWorker", "--limit", "1000").stdout
    return json.loads(out)


def committed_step(out) -> int:
    latest = checkpointing.latest_checkpoint(out / checkpointing.CHECKPOINTS_DIR)
    return int(latest.name.split("-")[1]) if latest else 0


def test_a_run_spans_both_nodes_and_survives_losing_one(cluster, tmp_path_factory, tiny_checkpoint, shared_data,
                                                         tmp_path):
    reference = reference_run(tmp_path_factory, tiny_checkpoint, shared_data)
    out = tmp_path / "run"
    raw = run_config(tiny_checkpoint, data_slices(tmp_path_factory, shared_data), out, 2)
    raw["workers"]["max_failures"] = 1
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))  # the task order is the schedule's
    log = tmp_path / "driver.log"
    first_nodes = cluster.node_ids()
    with open(log, "wb") as sink:
        driver = subprocess.Popen([str(BIN / "dist-minbert"), "train", "--config", str(config)], env=cluster.env,
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        # The rest of the run takes a few seconds (10 steps, 5 checkpoints): the kill must land within them.
        deadline = time.monotonic() + 240
        while committed_step(out) < KILL_AFTER_CHECKPOINT:
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no step-{KILL_AFTER_CHECKPOINT} checkpoint:\n{log.read_text()}"
            time.sleep(0.02)
        cluster.kill_node("node1")
        cluster.add_node("node2", 1)
        assert driver.wait(timeout=300) == 0, log.read_text()
    finally:
        if driver.poll() is None:
            driver.kill()
    attempts = logged_attempts(out)
    assert len(attempts) == 2, "the node was killed after the run had ended"
    # One rank on each node, then the restarted group: the head's rank again, the other on the replacement node.
    nodes = cluster.node_ids()
    per_node = {}
    for worker in train_workers(cluster):
        per_node[worker["node_id"]] = per_node.get(worker["node_id"], 0) + 1
    assert per_node == {nodes["head"]: 2, first_nodes["node1"]: 1, nodes["node2"]: 1}

    # One shared folder holds everything: both ranks' optimizer partitions in every checkpoint, rank 0's
    # TensorBoard files of both starts, and Ray Train's own run folder.
    final = checkpointing.latest_checkpoint(out / checkpointing.CHECKPOINTS_DIR)
    assert {p.name for p in final.glob("*optim_states.pt")} == \
        {f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)}
    assert {p.name for p in final.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert len(list(out.glob("ray_train-*"))) == 1
    first, restarted = attempts
    assert min(first) == 1
    # The restart continued from a checkpoint at or after the kill's, not from the start ...
    resumed_from = min(restarted) - 1
    assert resumed_from >= KILL_AFTER_CHECKPOINT and resumed_from % raw["checkpoint"]["every_steps"] == 0
    assert max(restarted) == NUM_STEPS
    # ... and read what the uninterrupted run read: the same samples consumed after every step, the same losses
    # and the same final state, so no sample was repeated or skipped.
    assert_continues(out, reference, first_step=1, tolerance=1e-6)
