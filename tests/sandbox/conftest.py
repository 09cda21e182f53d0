"""Sandbox fixtures: a real Docker backend, the base image, and both backends side by side.

Every container a test here creates carries `sandfleet.batch=<this session's prefix>-...`;
after each test an autouse fixture asserts none of them is left (and removes strays so
one failure does not cascade). Nothing else on the engine is ever touched.
"""

from __future__ import annotations

import itertools
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox.backend import SandboxBackend, SandboxSpec
from sandbox.container_spec import (
    LABEL_BATCH,
    LABEL_MANAGED,
    container_spec,
    sandbox_labels,
    sandbox_name,
)
from sandbox.fake_backend import FakeBackend
from sandbox.liveness import current_owner
from sandbox.templates import Template, load_template

SESSION_PREFIX = f"pytest-{uuid.uuid4().hex[:8]}"
FAKE_IMAGE = "sandfleet/base:fake"
_counter = itertools.count(1)
_engine: dict[str, Any] = {}


@pytest.fixture(scope="session")
def session_prefix() -> str:
    """The prefix of every batch id this session uses."""
    return SESSION_PREFIX


@pytest.fixture
def batch_id() -> str:
    """A batch id unique to this test, under this session's prefix."""
    return f"{SESSION_PREFIX}-{next(_counter)}"


@pytest.fixture(scope="session")
def docker_backend(docker_client: Any) -> Iterator[Any]:
    """A DockerBackend on the session's engine client."""
    from sandbox.docker_backend import DockerBackend

    backend = DockerBackend(client=docker_client)
    _engine["backend"] = backend
    yield backend
    _engine.pop("backend", None)
    backend.close()


@pytest.fixture
def minimal() -> Template:
    return load_template("minimal")


@dataclass(frozen=True)
class Rig:
    """A backend under test and an image it can run."""

    kind: str
    backend: SandboxBackend
    image: str

    def spec(
        self,
        template: Template,
        batch: str,
        command: list[str],
        workspace: Path,
        **labels: str,
    ) -> SandboxSpec:
        all_labels = sandbox_labels(
            batch=batch, task="t", attempt=1, team="tests", owner=current_owner().token()
        )
        all_labels.update(labels)
        return SandboxSpec(
            container_spec(
                template,
                image=self.image,
                labels=all_labels,
                workspace_host_path=str(workspace),
                name=sandbox_name(batch, "t", 1, uuid.uuid4().hex[:8]),
                command=command,
            )
        )


@pytest.fixture(params=["fake", "docker"])
def rig(request: pytest.FixtureRequest) -> Rig:
    """The same contract, run against the in-memory and the real backend."""
    if request.param == "fake":
        return Rig("fake", FakeBackend(images={FAKE_IMAGE}), FAKE_IMAGE)
    backend = request.getfixturevalue("docker_backend")
    return Rig("docker", backend, request.getfixturevalue("base_image"))


def _mounts_under(root: Path) -> list[str]:
    prefix = f"{root}/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    return [p for p in points if p.startswith(prefix)]


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh data directory; fails the test if a workspace tmpfs is left mounted in it."""
    d = tmp_path / "sandfleet-data"
    d.mkdir()
    yield d
    left = _mounts_under(d)
    for point in reversed(left):
        subprocess.run(["umount", point], check=True)
    assert not left, f"workspace mounts left behind: {left}"


@pytest.fixture
def fake_rig() -> Rig:
    """The in-memory backend alone (for FakeBackend specifics)."""
    return Rig("fake", FakeBackend(), FAKE_IMAGE)


@pytest.fixture
def rig_for() -> Callable[[SandboxBackend, str], Rig]:
    """A rig around any backend and image."""
    return lambda backend, image: Rig("custom", backend, image)


@pytest.fixture
def make_fake_rig() -> Callable[..., Rig]:
    """A FakeBackend rig built with the given FakeBackend kwargs (e.g. `run=`)."""
    return lambda **kwargs: Rig("fake", FakeBackend(**kwargs), FAKE_IMAGE)


@pytest.fixture
def host_workspace(tmp_path: Path) -> Path:
    """A plain host directory writable by the sandbox user, to bind at /workspace."""
    ws = tmp_path / "ws"
    ws.mkdir()
    ws.chmod(0o777)
    return ws


@pytest.fixture(autouse=True)
def _no_sandbox_left_behind() -> Iterator[None]:
    yield
    backend = _engine.get("backend")
    if backend is None:
        return
    left = [
        box
        for box in backend.list({LABEL_MANAGED: "1"})
        if box.labels.get(LABEL_BATCH, "").startswith(SESSION_PREFIX)
    ]
    for box in left:
        backend.remove(box.id)
    assert not left, f"containers left behind: {[b.name for b in left]}"
