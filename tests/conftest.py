"""Shared fixtures: real engines that skip locally and fail under CI=true when missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_engine(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where every engine must be present."""
    if CI:
        pytest.fail(f"{reason} (CI=true: engines are required; run `make setup`)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    """A real Docker engine client."""
    try:
        import docker

        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:  # any failure to reach the engine means "no engine"
        missing_engine(f"no Docker engine answers: {e}")
        raise  # unreachable; keeps type checkers calm
    yield client
    client.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data directory for one test."""
    d = tmp_path / "sandfleet-data"
    d.mkdir()
    return d
