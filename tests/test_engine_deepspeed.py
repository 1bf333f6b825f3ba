"""What build_engine asks of DeepSpeed before it initialises: no shared-memory all-reduce op compiled on CPU."""
from __future__ import annotations


def test_the_shared_memory_all_reduce_is_not_built(monkeypatch):
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from dist_minbert.engine.deepspeed_engine import SHM_COMM_OP, skip_shared_memory_all_reduce

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, SHM_COMM_OP, True)  # as DeepSpeed probes it on Linux
    skip_shared_memory_all_reduce()
    assert build_shm_op() is None  # it would have compiled and returned the op module
