"""The package never imports the launcher back: Ray lives at the edge (launch/), and dist_minbert reaches it only
from the CLI entry, and for the `workers` section of the run config, which is the leaf module launch/config.py."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-local imports included)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
    return modules


def is_launch(module: str) -> bool:
    return module == "launch" or module.startswith("launch.")


def test_only_the_cli_imports_the_launcher():
    cli = REPO / "dist_minbert" / "cli.py"
    offenders = {str(path.relative_to(REPO)): launch for path in sorted((REPO / "dist_minbert").rglob("*.py"))
                 if path != cli and (launch := sorted(m for m in imported_modules(path)
                                                      if is_launch(m) and m != "launch.config"))}
    assert offenders == {}


def test_launch_config_is_a_leaf():
    assert not [m for m in imported_modules(REPO / "launch" / "config.py") if m.startswith(("dist_minbert", "launch"))]


def test_the_check_sees_function_local_imports(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("def f():\n    from launch.ray_run import connect\n    import launch.worker\n")
    assert {m for m in imported_modules(source) if is_launch(m)} == {"launch.ray_run", "launch.worker"}
