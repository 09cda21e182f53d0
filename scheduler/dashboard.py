"""The Monitor's HTTP server: `/metrics`, JSON APIs and the live web dashboard.

`DashboardServer(core, host, port)` serves a `MonitorCore` with aiohttp on a thread of
its own (its own event loop), so it runs the same inside the Ray actor, under
`sandfleet dashboard` and in tests:

    GET /metrics               Prometheus text format (the core's own registry)
    GET /api/fleet             the fleet overview (JSON)
    GET /api/batch/{id}        one batch: counts, spend, its tasks, findings
    GET /api/task/{ref}        one task (`batch/task`, or a task id naming one task)
    GET /healthz               "ok"
    GET /, /batch/{id}, /task/{ref}   the dashboard (static page + scheduler/dashboard/)

The page polls the JSON APIs every `refresh_ms` (default 1000 ms; at most 2000).
No build step, no CDN: plain HTML, CSS and JavaScript from `scheduler/dashboard/`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Final

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from accounting.errors import ConfigError, SchedulerError
from scheduler.monitor import MonitorCore

__all__ = ["ASSETS", "DEFAULT_HOST", "DEFAULT_PORT", "MAX_REFRESH_MS", "DashboardServer"]

ASSETS: Final = Path(__file__).with_name("dashboard")
DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8266
MAX_REFRESH_MS: Final = 2000
_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":"), default=str),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


class DashboardServer:
    """Serves one `MonitorCore` on `host:port` (port 0 picks a free one); see the module doc."""

    def __init__(
        self,
        core: MonitorCore,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        *,
        refresh_ms: int = 1000,
        title: str = "sandfleet",
    ) -> None:
        if not 100 <= refresh_ms <= MAX_REFRESH_MS:
            raise ConfigError(f"refresh_ms {refresh_ms} must be within 100..{MAX_REFRESH_MS}")
        self.core, self.host, self.port = core, host, port
        self.refresh_ms, self.title = refresh_ms, title
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._page = (ASSETS / "index.html").read_text(encoding="utf-8")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # -- the app -----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/api/fleet", self._fleet)
        app.router.add_get("/api/batch/{id}", self._batch)
        app.router.add_get("/api/task/{ref:.+}", self._task)
        app.router.add_get("/static/{name}", self._static)
        for path in ("/", "/batch/{id}", "/task/{ref:.+}"):
            app.router.add_get(path, self._index)
        return app

    async def _index(self, request: web.Request) -> web.Response:
        page = self._page.replace("{{REFRESH_MS}}", str(self.refresh_ms))
        page = page.replace("{{TITLE}}", self.title)
        headers = {"Cache-Control": "no-store"}
        return web.Response(text=page, content_type="text/html", headers=headers)

    async def _static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = ASSETS / name
        if "/" in name or name.startswith(".") or not path.is_file() or path.suffix not in _TYPES:
            raise web.HTTPNotFound(text=f"no asset {name!r}")
        return web.Response(body=path.read_bytes(), content_type=_TYPES[path.suffix])

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.core.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _fleet(self, request: web.Request) -> web.Response:
        return _json({**self.core.fleet(), "refresh_ms": self.refresh_ms})

    async def _batch(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        data = self.core.batch(batch_id)
        if data is None:
            return _json({"error": f"no batch {batch_id!r} in the live state"}, 404)
        return _json(data)

    async def _task(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        data = self.core.task(ref)
        if data is None:
            return _json({"error": f"no task {ref!r} in the live state (or the id is not "
                                   "unique: use batch/task)"}, 404)  # fmt: skip
        return _json(data)

    # -- running on a thread -------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> str:
        """Start serving on a background thread; returns the URL once it listens."""
        if self._thread is not None:
            raise SchedulerError("this DashboardServer is already started")
        self._thread = threading.Thread(target=self._run, name="sandfleet-dashboard", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise SchedulerError(f"the dashboard did not start within {timeout_s:.0f}s")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise SchedulerError(
                f"cannot serve the dashboard on {self.host}:{self.port}: {self._error} "
                "(fix: pick another --port, or stop what listens there)"
            ) from self._error
        return self.url

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self.app(), access_log=None)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            sockets = getattr(site._server, "sockets", None)
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
            self._stop = asyncio.Event()
        except OSError as e:
            self._error = e
            loop.run_until_complete(runner.cleanup())
            loop.close()
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_until_complete(self._stop.wait())
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> DashboardServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
