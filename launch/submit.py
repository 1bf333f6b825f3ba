"""`python -m launch.submit --address http://HEAD:8265 --config configs/X.yaml [key=value ...]`.

Submits `dist-minbert train` as a Ray job with this checkout as its working directory. The config is
validated here first, so a typo fails in a second on the laptop instead of after the upload. The job runs
in Ray's copy of the working directory, so the config's relative local paths (data.root, train.output_dir,
…) are made absolute here and passed as overrides. A head with token authentication (Ray's default for a
`ray start` cluster once a token exists) is asked first whether it wants one, and the token found here
(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, as Ray looks) is checked against it.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dist_minbert.config import ConfigError, load_config
from dist_minbert.config_loader import to_plain

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


def path_overrides(config: str, overrides: list[str]) -> list[str]:
    """`key=/absolute/path` for each local path of the config that is relative as written (resolved against
    this directory, as `dist-minbert train` resolves them for a local run): in Ray's copy of the working
    directory a relative path such as the default data.root finds nothing."""
    as_written = _leaves(to_plain(load_config(config, overrides, resolve_paths=False)))
    resolved = _leaves(to_plain(load_config(config, overrides)))
    return [f"{key}={value}" for key, value in resolved.items() if value != as_written[key]]


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves by dotted key."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}.{key}".lstrip(".")).items()}


def is_local_address(address: str) -> bool:
    """Whether the head is this machine: loopback, this host's name, or one of its addresses."""
    host = urlsplit(address if "://" in address else f"http://{address}").hostname or ""
    if host in ("localhost", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback or host in _own_addresses()
    except ValueError:
        return False


def _own_addresses() -> set[str]:
    """This host's addresses: its name's, and the one it sends from (what `ray start` picks as the node IP)."""
    addresses = set()
    with contextlib.suppress(OSError):
        addresses.update(socket.gethostbyname_ex(socket.gethostname())[2])
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
        addresses.add(udp.getsockname()[0])
    return addresses


TOKEN_HELP = ("run `ray get-auth-token` on the head, then `export RAY_AUTH_TOKEN=<that token>` here "
              "(or save it as ~/.ray/auth_token)")


def local_token() -> tuple[str, str] | None:
    """(token, where it came from) as Ray's clients look for it: RAY_AUTH_TOKEN, the file at RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH", "")
    path = Path(named).expanduser() if named else Path.home() / ".ray" / "auth_token"
    if named and not path.is_file():
        raise ConfigError(f"RAY_AUTH_TOKEN_PATH={named}: no such file; {TOKEN_HELP}")
    token = path.read_text().strip() if path.is_file() else ""
    return (token, f"RAY_AUTH_TOKEN_PATH={named}" if named else str(path)) if token else None


def auth_env(address: str) -> dict[str, str]:
    """What `ray job submit` needs in its environment to talk to the head at `address`.

    Ray's clients send a token only with RAY_AUTH_MODE=token, which `ray start` does not hand to other shells.
    So the head is asked (its public /api/authentication_mode) and, when it authenticates, the token found here
    is tried on it: a missing or wrong token fails here, in one line that says what to do, instead of in
    Ray's 401 after the config was checked. A `ray://` or other non-HTTP address is left to Ray.
    """
    url = (address if "://" in address else f"http://{address}").rstrip("/")
    if urlsplit(url).scheme not in ("http", "https"):
        return {}
    try:
        mode = _get(address, f"{url}/api/authentication_mode").get("authentication_mode")
    except urllib.error.HTTPError:
        return {}  # a head older than token authentication
    if mode != "token":
        return {}
    found = local_token()
    if found is None:
        raise ConfigError(f"--address {address}: the head requires an authentication token and none was found here "
                          f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); {TOKEN_HELP}")
    token, where = found
    try:
        _get(address, f"{url}/api/version", token)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ConfigError(f"--address {address}: the head refuses the token from {where} (HTTP {exc.code}); "
                              f"{TOKEN_HELP}") from None
    return {"RAY_AUTH_MODE": "token"}


def _get(address: str, url: str, token: str = "") -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError:
        raise  # the head answered
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ConfigError(f"--address {address}: no Ray dashboard answers at {url} ({exc}); allowed: the head's "
                          f"dashboard address, e.g. http://HEAD:8265 (`ray start --head` prints it)") from None


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
        paths = path_overrides(args.config, args.overrides)  # loads, so validates, the config before any upload
        resolved = {p.partition("=")[0] for p in paths}  # the job gets these keys' absolute values instead
        overrides = [o for o in args.overrides if o.partition("=")[0] not in resolved] + paths
        command = build_command(address, args.config, overrides, args.working_dir,
                                _env_pairs(args.env), args.no_wait, _ray_executable())
        if paths and not is_local_address(address):
            print(f"launch.submit: warning: the head {address} is not this machine; the job uses these paths on "
                  f"its nodes, so they must be on storage every node mounts at the same path: {' '.join(paths)}",
                  file=sys.stderr)
        env = {} if args.dry_run else auth_env(address)
    except ConfigError as exc:
        print(f"launch.submit: error: {exc}", file=sys.stderr)
        return 2
    print(shlex.join([*(f"{k}={v}" for k, v in env.items()), *command]))
    if args.dry_run:
        return 0
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    sys.exit(main())
