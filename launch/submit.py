"""`python -m launch.submit --address http://HEAD:8265 --config configs/X.yaml [key=value ...]`.

Submits `dist-minbert train` as a Ray job with this checkout as its working directory. The config is
validated here first, so a typo fails in a second on the laptop instead of after the upload.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from dist_minbert.config import ConfigError, load_config

# Never uploaded: the local venv and run folders are large, and the cluster image brings its own packages.
UPLOAD_EXCLUDES = [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache"]
JOB_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def runtime_env(env: dict[str, str]) -> dict:
    return {"env_vars": {**JOB_ENV, **env}, "excludes": UPLOAD_EXCLUDES}


def job_config_path(config: str, working_dir: str) -> str:
    """The config's path inside the uploaded working directory, where the job's entrypoint runs."""
    path, root = Path(config).resolve(), Path(working_dir).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(f"--config {config}: outside --working-dir {working_dir}, so the job would not have it; "
                          "allowed: a file under the working directory") from None


def build_command(address: str, config: str, overrides: list[str], working_dir: str = ".",
                  env: dict[str, str] | None = None, no_wait: bool = False, ray: str = "ray") -> list[str]:
    """The `ray job submit … -- dist-minbert train …` argv."""
    command = [ray, "job", "submit", "--address", address, "--working-dir", working_dir,
               "--runtime-env-json", json.dumps(runtime_env(env or {}), separators=(",", ":"))]
    if no_wait:
        command.append("--no-wait")
    return [*command, "--", "dist-minbert", "train", "--config", job_config_path(config, working_dir), *overrides]


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE, e.g. NCCL_DEBUG=INFO")
        env[key] = value
    return env


def _ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment (works from an unactivated venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else "ray"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="", help="Ray dashboard address (default: RAY_ADDRESS)")
    parser.add_argument("--config", required=True, help="YAML file under the working directory, e.g. configs/b2.yaml")
    parser.add_argument("--working-dir", default=".", help="folder uploaded as the job's working directory")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra job environment")
    parser.add_argument("--no-wait", action="store_true", help="return after submission instead of streaming logs")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides passed to dist-minbert train")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        address = args.address or os.environ.get("RAY_ADDRESS", "")
        if not address:
            raise ConfigError("--address: not given and RAY_ADDRESS is unset; "
                              "allowed: the head's dashboard address, e.g. http://HEAD:8265")
        load_config(args.config, args.overrides)  # validate before uploading anything
        command = build_command(address, args.config, args.overrides, args.working_dir, _env_pairs(args.env),
                                args.no_wait, _ray_executable())
    except ConfigError as exc:
        print(f"launch.submit: error: {exc}", file=sys.stderr)
        return 2
    print(shlex.join(command))
    if args.dry_run:
        return 0
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
