"""Making sure a Docker engine answers: install Debian's docker.io and start dockerd if needed."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accounting.errors import EngineError

__all__ = ["DEFAULT_DOCKERD_LOG", "apt_install", "docker_client", "engine_version", "ensure_engine"]

DEFAULT_DOCKERD_LOG = "/var/log/sandfleet-dockerd.log"
Echo = Callable[[str], None]


def docker_client(timeout: int = 120) -> Any:
    """A docker SDK client for the local engine, or EngineError naming the fix."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env(timeout=timeout)
        _reuse_connections(client.api)
        client.ping()
    except DockerException as e:
        raise EngineError(
            f"no Docker engine answers ({e}); fix: run `make setup` "
            "(it installs docker.io and starts dockerd), or start dockerd yourself"
        ) from None
    return client


def _reuse_connections(api: Any) -> None:
    """Let the requests of a unix-socket client reuse their connections.

    docker-py keeps one connection pool per URL, so every request about another
    container (create, start, wait, logs, inspect, remove: each its own URL) opened a
    socket of its own, and the 26th pool closed the oldest; one pool for the socket
    reuses them. Its session also skips `~/.netrc` and the proxy variables on every
    request: neither means anything on a unix socket."""
    from docker.transport import UnixHTTPAdapter

    adapter = api.adapters.get("http+docker://")
    if type(adapter) is not UnixHTTPAdapter:
        return  # tcp or ssh: pooled by host already
    api.trust_env = False
    shared = _socket_pool_adapter()(f"http+unix://{adapter.socket_path}", adapter.timeout,
                                    max_pool_size=adapter.max_pool_size)  # fmt: skip
    api.mount("http+docker://", shared)
    api._custom_adapter = shared  # what docker-py falls back to for its own schemes
    adapter.close()


@functools.cache
def _socket_pool_adapter() -> type:
    """The adapter class (made on first use: docker is imported only when needed)."""
    from docker.transport import UnixHTTPAdapter

    class SocketPool(UnixHTTPAdapter):
        """One connection pool for the engine's socket, whatever the URL."""

        def get_connection(self, url: str, proxies: Any = None) -> Any:
            return super().get_connection("http+docker://localhost", proxies)

    return SocketPool


def engine_version() -> str | None:
    """The engine's version, or None when no engine answers."""
    try:
        client = docker_client(timeout=5)
    except EngineError:
        return None
    try:
        return str(client.version().get("Version"))
    finally:
        client.close()


def apt_install(packages: list[str], echo: Echo) -> None:
    """Install Debian packages (root only), with a clear error otherwise."""
    if os.geteuid() != 0:
        raise EngineError(
            f"{', '.join(packages)} missing and this is not root; "
            f"fix: run `sudo apt-get install -y {' '.join(packages)}`"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    echo(f"setup: apt-get install {' '.join(packages)}")
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise EngineError(f"`{' '.join(argv)}` failed: {done.stderr.strip()[-2000:]}")


def ensure_engine(*, log_path: str | None = None, wait_s: float = 90.0, echo: Echo = print) -> str:
    """Return the engine's version; install and start dockerd first when none answers."""
    version = engine_version()
    if version is not None:
        echo(f"setup: Docker engine {version} answers")
        return version
    if shutil.which("dockerd") is None:
        apt_install(["docker.io"], echo)
    log = Path(log_path or os.environ.get("SANDFLEET_DOCKERD_LOG", DEFAULT_DOCKERD_LOG))
    log.parent.mkdir(parents=True, exist_ok=True)
    echo(f"setup: starting dockerd in the background (log: {log})")
    with log.open("ab") as out:
        subprocess.Popen(
            ["dockerd"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        version = engine_version()
        if version is not None:
            echo(f"setup: Docker engine {version} answers")
            return version
        time.sleep(0.5)
    tail = log.read_text(errors="replace").splitlines()[-15:]
    raise EngineError(
        f"dockerd did not answer within {wait_s:.0f}s; its log ({log}) ends with:\n"
        + "\n".join(tail)
        + "\nfix: read the log; another dockerd may hold /var/run/docker.pid"
    )
