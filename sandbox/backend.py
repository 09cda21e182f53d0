"""The sandbox seam: a small `SandboxBackend` protocol and the records it speaks.

`DockerBackend` (docker_backend.py) is the real one; `FakeBackend` (fake_backend.py) is a
faithful in-memory one for fast tests of the logic above the seam. A sandbox is created
from a `SandboxSpec` — the docker SDK `containers.create` kwargs that `container_spec()`
builds as a pure function — and is named by the id `create` returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ExecResult",
    "SandboxBackend",
    "SandboxInfo",
    "SandboxSpec",
    "SandboxStatus",
    "Stats",
    "Stream",
    "WaitResult",
]

Stream = Literal["stdout", "stderr"]


class SandboxStatus(StrEnum):
    """Where a sandbox is in its life (Docker's own words)."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    DEAD = "dead"
    OTHER = "other"


def _freeze(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(kwargs))


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one sandbox: docker SDK `containers.create` kwargs.

    Built by `sandbox.container_spec.container_spec()`; read-only once made.
    """

    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kwargs", _freeze(self.kwargs))
        for key in ("image", "name", "labels"):
            if key not in self.kwargs:
                raise ValueError(f"a SandboxSpec needs {key!r} (build it with container_spec())")

    @property
    def image(self) -> str:
        return str(self.kwargs["image"])

    @property
    def name(self) -> str:
        return str(self.kwargs["name"])

    @property
    def labels(self) -> Mapping[str, str]:
        return dict(self.kwargs["labels"])

    @property
    def command(self) -> tuple[str, ...]:
        return tuple(self.kwargs.get("command") or ())

    def create_kwargs(self) -> dict[str, Any]:
        """A fresh, mutable copy of the kwargs (for `client.containers.create(**...)`)."""
        return dict(self.kwargs)


@dataclass(frozen=True)
class ExecResult:
    """What a command run with `exec` inside a running sandbox gave back."""

    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class WaitResult:
    """How a sandbox's main process ended.

    `oom` is reported apart from `exit_code`: on cgroup v1 the kernel may kill only a child
    (the sandbox then exits 0 or 1 with `oom` true). `timed_out` means the backend killed
    the sandbox at its timeout (exit_code is then 137). `duration_s` is the engine's own
    start-to-finish time of the main process.
    """

    exit_code: int
    oom: bool
    timed_out: bool
    duration_s: float


@dataclass(frozen=True)
class Stats:
    """A one-shot sample of a sandbox's resource use (cgroup counters)."""

    cpu_ns: int
    memory_bytes: int
    memory_limit_bytes: int
    memory_peak_bytes: int
    pids: int


@dataclass(frozen=True)
class SandboxInfo:
    """One sandbox as `list` sees it."""

    id: str
    name: str
    status: SandboxStatus
    labels: Mapping[str, str]


@runtime_checkable
class SandboxBackend(Protocol):
    """Create, run and remove sandboxes. Ids are whatever `create` returned."""

    def create(self, spec: SandboxSpec) -> str:
        """Create (do not start) a sandbox; return its id."""
        ...

    def start(self, sandbox_id: str) -> None:
        """Start the sandbox's main process."""
        ...

    def exec(self, sandbox_id: str, argv: Sequence[str]) -> ExecResult:
        """Run `argv` inside the running sandbox (as its user, in its working dir)."""
        ...

    def wait(self, sandbox_id: str, timeout: float | None = None) -> WaitResult:
        """Wait for the main process to end; kill it after `timeout` seconds (timed_out)."""
        ...

    def logs(self, sandbox_id: str, stream: Stream, *, follow: bool = False) -> Iterator[bytes]:
        """Chunks of one output stream; with `follow`, until the sandbox stops."""
        ...

    def stop(self, sandbox_id: str, grace_s: float = 0.0) -> None:
        """Stop the sandbox (SIGTERM, then SIGKILL after `grace_s`). No-op when stopped."""
        ...

    def remove(self, sandbox_id: str) -> None:
        """Remove the sandbox, killing it first if needed. No-op when already gone."""
        ...

    def stats(self, sandbox_id: str) -> Stats:
        """A one-shot resource sample of a running sandbox."""
        ...

    def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        """Every sandbox (running or not) carrying all of `labels`."""
        ...
