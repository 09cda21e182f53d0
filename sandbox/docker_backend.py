"""`DockerBackend`: the `SandboxBackend` protocol on a real Docker engine (docker SDK).

Engine errors become sandfleet errors that say what to do next: a missing image names
`sandfleet images build`, an engine that does not answer names `make setup`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import _create_container_args  # what containers.create uses

from accounting.errors import EngineError, ImageError, SandboxError
from sandbox.backend import (
    ExecResult,
    SandboxInfo,
    SandboxSpec,
    SandboxStatus,
    Stats,
    Stream,
    WaitResult,
)

__all__ = ["DockerBackend"]

_KILL_WAIT_S = 60.0  # how long a killed container may take to be reported exited


@contextmanager
def _engine_errors(action: str, sandbox_id: str = "") -> Iterator[None]:
    """Turn docker SDK / transport errors into sandfleet errors naming the fix."""
    what = f" {sandbox_id[:12]}" if sandbox_id else ""
    try:
        yield
    except ImageNotFound as e:
        raise ImageError(
            f"cannot {action}: image missing ({e.explanation}); "
            "fix: run `sandfleet images build` (or `make setup`)"
        ) from None
    except NotFound as e:
        raise SandboxError(
            f"cannot {action}{what}: no such sandbox ({e.explanation}); "
            "it was removed (by `sandfleet sandbox reap`?) or never created"
        ) from None
    except APIError as e:
        raise SandboxError(f"Docker refused to {action}{what}: {e.explanation or e}") from None
    except (requests.exceptions.RequestException, DockerException) as e:
        raise EngineError(
            f"cannot {action}{what}: the Docker engine does not answer ({e}); "
            "fix: run `make setup` (it starts dockerd), or start dockerd yourself"
        ) from None


def _parse_time(value: str) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, `Z`) -> aware datetime; None for the zero time."""
    if not value or value.startswith("0001-"):
        return None
    head, _, frac = value.rstrip("Z").partition(".")
    tz = "+00:00"
    for sign in ("+", "-"):
        if sign in frac:
            frac, _, off = frac.partition(sign)
            tz = sign + off
    micro = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{micro}{tz}")


def _status(state: str) -> SandboxStatus:
    try:
        return SandboxStatus(state)
    except ValueError:
        return SandboxStatus.OTHER


class DockerBackend:
    """Sandboxes as Docker containers. Give it a client, or it opens one from the environment.

    Following logs and `exec` read the engine's socket without a timeout (docker SDK), so a
    command may stay silent for longer than the client's request timeout.
    """

    def __init__(self, client: docker.DockerClient | None = None) -> None:
        if client is None:
            from sandbox.engine import docker_client

            client = docker_client()
        self.client = client
        self._runtimes: frozenset[str] | None = None

    def close(self) -> None:
        self.client.close()

    # -- lifecycle ---------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> str:
        kwargs = spec.create_kwargs()
        runtime = kwargs.get("runtime")
        if runtime and runtime not in self._known_runtimes():
            raise SandboxError(
                f"runtime {runtime!r} is not registered with this Docker engine "
                f"(it knows: {', '.join(sorted(self._known_runtimes()))}); fix: install gVisor "
                "(`apt-get install runsc`), register it in /etc/docker/daemon.json and restart "
                "dockerd, or set `runtime: runc` in the template"
            )
        # The low-level call: `containers.create` would inspect the new container too.
        args = _create_container_args({**kwargs, "version": self.client.api._version})
        with _engine_errors(f"create sandbox {spec.name} from {spec.image}"):
            created = self.client.api.create_container(**args)
        return str(created["Id"])

    def start(self, sandbox_id: str) -> None:
        with _engine_errors("start sandbox", sandbox_id):
            self.client.api.start(sandbox_id)

    def exec(self, sandbox_id: str, argv: Sequence[str]) -> ExecResult:
        with _engine_errors(f"exec {list(argv)!r} in sandbox", sandbox_id):
            created = self.client.api.exec_create(sandbox_id, list(argv), stdout=True, stderr=True)
            out, err = self.client.api.exec_start(created["Id"], demux=True)
            code = self.client.api.exec_inspect(created["Id"])["ExitCode"]
        return ExecResult(exit_code=int(code), stdout=out or b"", stderr=err or b"")

    def wait(self, sandbox_id: str, timeout: float | None = None) -> WaitResult:
        timed_out = False
        with _engine_errors("wait for sandbox", sandbox_id):
            try:
                self.client.api.wait(sandbox_id, timeout=timeout)
            except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
                if timeout is None:
                    raise
                # The engine answers inspect: this was our timeout, not a lost engine.
                if self._state(sandbox_id).get("Running") is True:
                    timed_out = self._kill(sandbox_id)
                    self.client.api.wait(sandbox_id, timeout=_KILL_WAIT_S)
            state = self._state(sandbox_id)
        started = _parse_time(state.get("StartedAt", ""))
        finished = _parse_time(state.get("FinishedAt", ""))
        duration = (finished - started).total_seconds() if started and finished else 0.0
        return WaitResult(
            exit_code=int(state.get("ExitCode", -1)),
            oom=bool(state.get("OOMKilled")),
            timed_out=timed_out,
            duration_s=max(duration, 0.0),
        )

    def logs(self, sandbox_id: str, stream: Stream, *, follow: bool = False) -> Iterator[bytes]:
        with _engine_errors(f"read the {stream} of sandbox", sandbox_id):
            chunks = self.client.api.logs(
                sandbox_id,
                stdout=stream == "stdout",
                stderr=stream == "stderr",
                stream=True,
                follow=follow,
            )
            yield from chunks

    def stop(self, sandbox_id: str, grace_s: float = 0.0) -> None:
        with _engine_errors("stop sandbox", sandbox_id):
            self.client.api.stop(sandbox_id, timeout=max(0, round(grace_s)))

    def remove(self, sandbox_id: str) -> None:
        try:
            with _engine_errors("remove sandbox", sandbox_id):
                self.client.api.remove_container(sandbox_id, force=True, v=True)
        except SandboxError as e:
            if "no such sandbox" in str(e) or "already in progress" in str(e):
                return
            raise

    def stats(self, sandbox_id: str) -> Stats:
        with _engine_errors("sample sandbox stats", sandbox_id):
            raw: dict[str, Any] = self.client.api.stats(sandbox_id, stream=False, one_shot=True)
        cpu = raw.get("cpu_stats", {}).get("cpu_usage", {}).get("total_usage", 0)
        mem = raw.get("memory_stats", {})
        return Stats(
            cpu_ns=int(cpu or 0),
            memory_bytes=int(mem.get("usage", 0) or 0),
            memory_limit_bytes=int(mem.get("limit", 0) or 0),
            memory_peak_bytes=int(mem.get("max_usage", 0) or mem.get("usage", 0) or 0),
            pids=int(raw.get("pids_stats", {}).get("current", 0) or 0),
        )

    def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        with _engine_errors("list sandboxes"):
            rows = self.client.api.containers(all=True, filters=filters)
        return [
            SandboxInfo(
                id=row["Id"],
                name=(row.get("Names") or ["/"])[0].lstrip("/"),
                status=_status(row.get("State", "")),
                labels=dict(row.get("Labels") or {}),
            )
            for row in rows
        ]

    # -- helpers -----------------------------------------------------------------

    def _state(self, sandbox_id: str) -> dict[str, Any]:
        state: dict[str, Any] = self.client.api.inspect_container(sandbox_id)["State"]
        return state

    def _kill(self, sandbox_id: str) -> bool:
        """SIGKILL a running sandbox; False when it had already exited on its own."""
        try:
            self.client.api.kill(sandbox_id)
        except APIError as e:
            if e.status_code == 409:  # "is not running": it ended just before the kill
                return False
            raise
        return True

    def _known_runtimes(self) -> frozenset[str]:
        if self._runtimes is None:
            with _engine_errors("list the engine's runtimes"):
                info = self.client.info()
            self._runtimes = frozenset(info.get("Runtimes") or {"runc": {}})
        return self._runtimes
