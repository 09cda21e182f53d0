"""The forwarder on the host, as a real subprocess: relaying, preambles, half-close, the agent."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sandbox.forwarder
from sandbox.forwarder import agent_env

FORWARDER = str(Path(sandbox.forwarder.__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoGateway:
    """A unix server that answers `<preamble line>|<everything until EOF>` and closes."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                line, _, rest = data.partition(b"\r\n")
                conn.sendall(line + b"|" + rest)

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def sockdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sffwd-", dir="/tmp"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def start(
    sock: Path, *argv: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], int, int]:
    llm, proxy = free_port(), free_port()
    cmd = [
        sys.executable,
        FORWARDER,
        "--socket",
        str(sock),
        "--llm-port",
        str(llm),
        "--proxy-port",
        str(proxy),
        "--token-file",
        str(sock.parent / "token"),
    ]
    if argv:
        cmd += ["--", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 20
    while True:  # wait until both ports listen (or the forwarder died)
        try:
            for port in (llm, proxy):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, llm, proxy
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"forwarder did not start: {proc.communicate()}") from None
            time.sleep(0.02)


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # half-close: the reply must still come back
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_agent_env_points_the_sdk_and_both_proxy_spellings_at_the_forwarder() -> None:
    env = agent_env("sft1.k.p.s")
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"
    assert env["OPENAI_API_KEY"] == "sft1.k.p.s"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == "127.0.0.1,localhost"


def test_each_port_is_relayed_with_its_preamble_and_half_close(sockdir: Path) -> None:
    gw = EchoGateway(sockdir / "gw.sock")
    proc, llm, proxy = start(sockdir / "gw.sock")
    try:
        big = os.urandom(3 * 1024 * 1024)
        assert exchange(llm, b"hello") == b"SANDFLEET/1 llm|hello"
        assert exchange(proxy, big) == b"SANDFLEET/1 proxy|" + big
    finally:
        proc.terminate()
        proc.wait(10)
        gw.close()


def test_a_missing_gateway_refuses_the_agents_connection(sockdir: Path) -> None:
    proc, llm, _ = start(sockdir / "absent.sock")
    try:
        try:  # a 502, or a reset when the unread request made the kernel drop it
            reply = exchange(llm, b"GET /v1/models HTTP/1.1\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 502 Bad Gateway")
        except ConnectionResetError:
            pass
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "cannot reach the gateway" in err


def test_the_agent_gets_the_token_file_and_its_exit_status_is_the_forwarders(sockdir: Path) -> None:
    (sockdir / "token").write_text("sft1.k.p.s\n")
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    agent = (
        "import os, sys; print(os.environ['OPENAI_API_KEY'], os.environ['HTTPS_PROXY']); "
        "sys.exit(7)"
    )
    proc = subprocess.run(
        [
            sys.executable,
            FORWARDER,
            "--socket",
            str(sockdir / "gw.sock"),
            "--llm-port",
            str(free_port()),
            "--proxy-port",
            str(free_port()),
            "--token-file",
            str(sockdir / "token"),
            "--",
            sys.executable,
            "-c",
            agent,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 7
    assert proc.stdout.split() == ["sft1.k.p.s", "http://127.0.0.1:3128"]


def test_sigterm_reaches_the_agent(sockdir: Path) -> None:
    agent = "import sys, time; print('started', flush=True); time.sleep(120)"
    proc, _, _ = start(sockdir / "gw.sock", sys.executable, "-c", agent)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
