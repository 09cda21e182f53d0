"""The Monitor's HTTP server and live dashboard: JSON APIs, /metrics and static assets on
loopback; and in real headless Chromium (driven over CDP) the page shows an active task's
command after it starts, refreshing itself every two seconds or faster. Screenshots are
saved under test-artifacts/."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import missing_engine

from accounting.errors import SchedulerError
from scheduler.dashboard import MAX_REFRESH_MS, DashboardServer
from scheduler.event_builder import AttemptEvents
from scheduler.monitor import MonitorCore

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def fleet_core() -> tuple[MonitorCore, AttemptEvents]:
    now = datetime.now(UTC)
    core = MonitorCore()
    a = AttemptEvents(
        "ml-research", "nightly-1a2b3c", "fix-login", node="node-3", t0=now - timedelta(minutes=3)
    )
    core.ingest(
        [
            a.submitted(0, 2, template="python-3.12"),
            a.state(0, "queued"),
            AttemptEvents("ml-research", "nightly-1a2b3c", "add-tests", t0=a.t0).state(0, "queued"),
        ]
    )
    return core, a


@pytest.fixture
def served() -> Iterator[tuple[MonitorCore, AttemptEvents, DashboardServer]]:
    core, a = fleet_core()
    server = DashboardServer(core, "127.0.0.1", 0, refresh_ms=1000)
    server.start()
    try:
        yield core, a, server
    finally:
        server.stop()


def test_the_json_apis_serve_the_fleet_a_batch_and_a_task(served: Any) -> None:
    core, a, server = served
    core.ingest([a.state(10, "running"), a.command(12, ["pytest", "-x"]), a.llm(20, 500, 50)])
    status, ctype, body = get(server.url + "api/fleet")
    fleet = json.loads(body)
    assert status == 200 and ctype.startswith("application/json")
    assert [x["command"] for x in fleet["active"]] == [["pytest", "-x"]]
    assert fleet["refresh_ms"] <= MAX_REFRESH_MS and fleet["queue_depth"] == 1
    batch = json.loads(get(server.url + "api/batch/nightly-1a2b3c")[2])
    assert batch["total"] == 2 and batch["tasks"][0]["template"] == "python-3.12"
    for ref in ("nightly-1a2b3c/fix-login", "fix-login", "nightly-1a2b3c%2Ffix-login"):
        task = json.loads(get(server.url + "api/task/" + ref)[2])
        assert task["task"] == "nightly-1a2b3c/fix-login", ref
        assert task["attempts"][0]["llm"]["calls"] == 1
    status, _, body = get(server.url + "api/task/nope")
    assert status == 404 and "no task" in json.loads(body)["error"]
    assert get(server.url + "api/batch/nope")[0] == 404


def test_metrics_and_the_page_and_its_assets_are_served(served: Any) -> None:
    _, _, server = served
    status, ctype, body = get(server.url + "metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert 'sandfleet_tasks{state="queued",team="ml-research"} 2.0' in body
    for path in ("", "batch/nightly-1a2b3c", "task/nightly-1a2b3c/fix-login"):
        status, ctype, page = get(server.url + path)
        assert status == 200 and ctype.startswith("text/html")
        assert '<meta name="sandfleet-refresh-ms" content="1000">' in page
    for asset, kind in (("app.js", "javascript"), ("style.css", "css"), ("favicon.svg", "svg")):
        status, ctype, _ = get(server.url + "static/" + asset)
        assert status == 200 and kind in ctype
    assert get(server.url + "static/..%2Fmonitor.py")[0] == 404
    assert get(server.url + "static/index.html")[0] == 404
    assert get(server.url + "healthz")[2] == "ok\n"


def test_a_busy_port_is_refused_with_the_fix(served: Any) -> None:
    core, _, server = served
    with pytest.raises(SchedulerError, match="another --port"):
        DashboardServer(core, "127.0.0.1", server.port).start()


def test_a_refresh_slower_than_two_seconds_is_refused() -> None:
    from accounting.errors import ConfigError

    with pytest.raises(ConfigError):
        DashboardServer(MonitorCore(), refresh_ms=5000)


# -- real headless Chromium -------------------------------------------------------------


class Chromium:
    """A headless Chromium of this test's own, driven over the DevTools protocol."""

    FLAGS = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--disable-extensions",
        "--mute-audio",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--window-size=1440,900",
    ]

    def __init__(self, binary: str, profile: Path) -> None:
        self.profile = profile
        self.proc = subprocess.Popen(
            [binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._id = 0

    def port(self, timeout: float = 60.0) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (marker.exists() and marker.read_text().strip()):
            if self.proc.poll() is not None:
                pytest.fail(f"chromium exited with {self.proc.returncode} before listening")
            if time.monotonic() > deadline:
                pytest.fail("chromium did not open its DevTools port")
            time.sleep(0.1)
        return int(marker.read_text().split()[0])

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    async def call(self, ws: Any, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        await ws.send_json({"id": self._id, "method": method, "params": params})
        while True:
            msg = await ws.receive_json(timeout=60)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"CDP {method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def text(self, ws: Any) -> str:
        r = await self.call(
            ws, "Runtime.evaluate", expression="document.body.innerText", returnByValue=True
        )
        return str(r["result"].get("value", ""))

    async def wait_text(self, ws: Any, needle: str, timeout: float = 20.0) -> float:
        """Poll the page's text until it holds `needle`; returns the seconds it took."""
        start = time.monotonic()
        while needle not in await self.text(ws):
            if time.monotonic() - start > timeout:
                pytest.fail(f"the page did not show {needle!r} within {timeout:.0f}s")
            await asyncio.sleep(0.05)
        return time.monotonic() - start

    async def screenshot(self, ws: Any, name: str) -> Path:
        shot = await self.call(ws, "Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[Chromium]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        missing_engine("chromium is not installed (apt-get install chromium)")
        return
    browser = Chromium(binary, tmp_path / "profile")
    try:
        yield browser
    finally:
        browser.close()


async def drive(browser: Chromium, served: Any) -> dict[str, Any]:
    import aiohttp

    core, a, server = served
    port = browser.port()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in await resp.json() if t["type"] == "page"]
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            await browser.call(ws, "Page.enable")
            await browser.call(ws, "Page.navigate", url=server.url)
            await browser.wait_text(ws, "Active sandboxes".upper())
            refresh = await browser.call(
                ws,
                "Runtime.evaluate",
                returnByValue=True,
                expression='Number(document.querySelector("meta[name=sandfleet-refresh-ms]").content)',
            )
            assert "pytest -x tests/test_login.py" not in await browser.text(ws)
            # The attempt starts and runs a command: the open page must show it by itself.
            core.ingest([a.state(170, "running")])
            started = time.monotonic()
            core.ingest(
                [
                    a.command(175, ["pytest", "-x", "tests/test_login.py"]),
                    *[a.sample(170 + i, i * 400_000, (300 + 10 * i) << 20) for i in range(8)],
                ]
            )
            await browser.wait_text(ws, "pytest -x tests/test_login.py")
            shown_s = time.monotonic() - started
            fleet_png = await browser.screenshot(ws, "dashboard-fleet.png")
            await browser.call(
                ws, "Page.navigate", url=server.url + "task/nightly-1a2b3c/fix-login"
            )
            await browser.wait_text(ws, "COMMANDS")
            core.ingest(
                [
                    a.file(178, "/workspace/src/login.py", "modify", 2048),
                    a.finished(179, ["pytest", "-x", "tests/test_login.py"], a._pid, exit=1),
                ]
            )
            await browser.wait_text(ws, "/workspace/src/login.py")
            task_text = await browser.text(ws)
            task_png = await browser.screenshot(ws, "dashboard-task.png")
            svg = await browser.call(
                ws,
                "Runtime.evaluate",
                returnByValue=True,
                expression="document.querySelectorAll('svg.chart polyline').length",
            )
    return {
        "refresh_ms": refresh["result"]["value"],
        "shown_s": shown_s,
        "task_text": task_text,
        "pngs": [fleet_png, task_png],
        "polylines": svg["result"]["value"],
    }


def test_the_dashboard_shows_an_active_tasks_command_in_headless_chromium(
    chromium: Chromium, served: Any
) -> None:
    seen = asyncio.run(drive(chromium, served))
    assert seen["refresh_ms"] <= MAX_REFRESH_MS  # the page refreshes itself every <= 2 s
    assert "fix-login" in seen["task_text"] and "python-3.12" in seen["task_text"]
    assert seen["polylines"] == 2  # the resource chart: CPU and memory lines
    for png in seen["pngs"]:
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    (ARTIFACTS / "dashboard-latency.json").write_text(
        json.dumps(
            {"command_shown_after_s": round(seen["shown_s"], 3), "refresh_ms": seen["refresh_ms"]}
        )
        + "\n"
    )
