"""Each package's public API, and the one-way dependencies DESIGN.md fixes."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("accounting", "sandbox", "scheduler")
# What each package may import from the others (DESIGN.md: scheduler -> sandbox -> accounting).
ALLOWED = {"accounting": set(), "sandbox": {"accounting"}, "scheduler": {"accounting", "sandbox"}}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_is_importable(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package: str) -> None:
    forbidden = set(PACKAGES) - ALLOWED[package] - {package}
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in (ROOT / package).rglob("*.py")
        if _imported_packages(path) & forbidden
    }
    assert offenders == {}


def test_sandbox_knows_nothing_of_ray() -> None:
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "sandbox").rglob("*.py")
        if "ray" in _imported_packages(p)
    ]
    assert offenders == []


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("accounting.pricing", ("duckdb", "ray", "docker")),
        ("accounting.policies", ("duckdb", "ray", "docker")),
        ("sandbox.templates", ("duckdb", "ray", "docker")),
        ("sandbox.credentials", ("duckdb", "ray", "docker")),
        ("scheduler.spec", ("duckdb", "ray", "docker")),
        ("scheduler.queue", ("duckdb", "ray", "docker", "pyarrow")),
    ],
)
def test_light_modules_do_not_import_heavy_engines(module: str, heavy: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout.split()
    assert loaded == []
