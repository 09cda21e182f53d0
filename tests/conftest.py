"""Shared fixtures: real engines that skip locally and fail under CI=true when missing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import missing_engine, require_image

__all__ = ["missing_engine"]


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A real Docker engine client."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as e:
        missing_engine(f"no Docker engine answers: {e}")
        raise  # unreachable: missing_engine skips or fails
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    """The base image's tag; skip (fail under CI) when it is not built."""
    return require_image(docker_client, "base")


@pytest.fixture(scope="session")
def python_image(docker_client: Any) -> str:
    """The python template image's tag; skip (fail under CI) when it is not built."""
    return require_image(docker_client, "python")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data directory for one test."""
    d = tmp_path / "sandfleet-data"
    d.mkdir()
    return d
