"""Every pin in constraints.txt must satisfy its floor in pyproject.toml."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def version(text):
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def floors():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return dict(re.match(r"([\w.-]+)\s*>=\s*([\w.]+)", s).groups() for s in specs if ">=" in s)


def pins():
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def test_every_pin_meets_its_floor():
    for name, floor in floors().items():
        assert name in pins(), f"{name} is not pinned in constraints.txt"
        assert version(pins()[name]) >= version(floor), f"{name}=={pins()[name]} < {floor}"
