"""`sandfleet dashboard` and `sandfleet top`: the live view, in a browser or a terminal.

- `sandfleet dashboard` prints the URL of the running Monitor's dashboard; with
  `--data-dir` it starts a standalone Monitor over that ledger instead (its events are
  replayed into the live state, for post-hoc viewing) and serves until Ctrl-C.
- `sandfleet top` is the terminal version: it polls a Monitor's `/api/fleet` (or replays
  a ledger with `--data-dir`) and redraws a rich table of the fleet.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from accounting.errors import ConfigError
from accounting.policies import load_policies
from scheduler.dashboard import DEFAULT_HOST, DEFAULT_PORT, DashboardServer
from scheduler.monitor import MonitorCore

__all__ = ["COMMANDS", "fetch_fleet", "render_top"]

DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}/"
_FAILED = ("failed", "oom", "timed_out", "budget_exceeded", "stopped_by_rule", "rejected")


def fetch_fleet(url: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """GET `<url>api/fleet` from a running Monitor."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"--url {url!r} must be an http:// or https:// URL")
    api = url.rstrip("/") + "/api/fleet"
    try:
        with urllib.request.urlopen(api, timeout=timeout_s) as resp:  # noqa: S310 - checked above
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(
            f"no sandfleet Monitor answers at {url} ({e}); fix: start a batch with "
            "`sandfleet run`, pass the Monitor's --url, or view a ledger with --data-dir DIR"
        ) from e


def _replayed(data_dir: str) -> MonitorCore:
    core = MonitorCore(load_policies().anomalies)
    core.replay(data_dir)
    return core


def _argv(words: list[str] | None) -> str:
    return " ".join(words or []) or "—"


def render_top(fleet: dict[str, Any], *, source: str = "") -> Group:
    """One frame of `sandfleet top`: totals, teams, active sandboxes and findings."""
    st = fleet.get("states", {})
    failed = sum(st.get(s, 0) for s in _FAILED)
    head = Text.assemble(
        ("sandfleet top", "bold"), "  ", (source, "dim"), "\n",
        ("running ", "dim"), (str(st.get("running", 0)), "bold blue"),
        ("  queued ", "dim"), (str(fleet.get("queue_depth", 0)), "bold"),
        ("  succeeded ", "dim"), (str(st.get("succeeded", 0)), "bold green"),
        ("  failed ", "dim"), (str(failed), "bold red" if failed else "bold"),
        ("  spend ", "dim"), ("$" + str(fleet.get("spend", {}).get("total", "0")), "bold"),
        ("  findings ", "dim"), (str(len(fleet.get("findings", []))), "bold yellow"),
    )  # fmt: skip
    teams = Table(box=None, header_style="dim", pad_edge=False, expand=False)
    for col in ("team", "queued", "running", "succeeded", "failed", "spend"):
        teams.add_column(col, justify="left" if col == "team" else "right")
    for team, s in fleet.get("teams", {}).items():
        spend = fleet.get("spend", {}).get("by_team", {}).get(team, "0")
        teams.add_row(team, str(s.get("queued", 0)), str(s.get("running", 0)),
                      str(s.get("succeeded", 0)), str(sum(s.get(k, 0) for k in _FAILED)),
                      f"${spend}")  # fmt: skip
    active = Table(box=None, header_style="dim", pad_edge=False, expand=True)
    for col, just in (("task", "left"), ("team", "left"), ("node", "left"), ("cpu", "right"),
                      ("mem", "right"), ("llm", "right"), ("spend", "right"),
                      ("command", "left")):  # fmt: skip
        active.add_column(
            col, justify=just, overflow="ellipsis", no_wrap=True,  # type: ignore[arg-type]
            min_width=14 if col == "task" else None,
        )  # fmt: skip
    for a in fleet.get("active", []):
        cpu = "" if a.get("cpu_pct") is None else f"{a['cpu_pct']:.0f}%"
        mem = "" if a.get("mem") is None else f"{a['mem'] / 2**20:.0f}M"
        cmd = Text(_argv(a.get("command")), style="" if a.get("command_running") else "dim")
        active.add_row(a["task"], a["team"], a.get("node") or "", cpu, mem,
                       str(a.get("llm_calls", 0)), f"${a.get('spend', '0')}", cmd)  # fmt: skip
    findings = Table(box=None, header_style="dim", pad_edge=False, expand=True)
    for col, least in (("rule", 16), ("action", 8), ("task", 14), ("detail", None)):
        findings.add_column(col, overflow="ellipsis", no_wrap=True, min_width=least)
    for f in fleet.get("findings", [])[:10]:
        findings.add_row(f["rule"], f["action"], f["task"], f["detail"])
    parts: list[Any] = [head, Text(""), teams, Text(""), active]
    if fleet.get("findings"):
        parts += [Text(""), findings]
    return Group(*parts)


@click.command("dashboard")
@click.option("--data-dir", default=None, help="Serve a standalone view of this ledger.")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to serve on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="Port.")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The running Monitor.")
@click.option("--no-wait", is_flag=True, hidden=True, help="Print the URL and stop serving.")
def dashboard(data_dir: str | None, host: str, port: int, url: str, no_wait: bool) -> None:
    """Print the live dashboard's URL (or serve a ledger's with --data-dir)."""
    if data_dir is None:
        fetch_fleet(url)  # raises with the fix when none answers
        click.echo(url)
        return
    core = _replayed(data_dir)
    server = DashboardServer(core, host, port, title=f"sandfleet · {data_dir}")
    served = server.start()
    click.echo(served)
    try:
        if not no_wait:
            click.echo("serving a replay of the ledger; Ctrl-C stops", err=True)
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        core.close()


@click.command("top")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="The running Monitor.")
@click.option("--data-dir", default=None, help="Replay this ledger instead of polling.")
@click.option("--interval", default=1.0, show_default=True, type=float, help="Seconds.")
@click.option("--once", is_flag=True, help="Print one frame and exit.")
def top(url: str, data_dir: str | None, interval: float, once: bool) -> None:
    """The fleet in the terminal: tasks, active sandboxes, spend and findings."""
    console = Console()
    if data_dir is not None:
        core = _replayed(data_dir)
        console.print(render_top(core.fleet(), source=data_dir))
        return
    if once:
        console.print(render_top(fetch_fleet(url), source=url))
        return
    with Live(render_top(fetch_fleet(url), source=url), console=console,
              refresh_per_second=4, screen=False) as live:  # fmt: skip
        try:
            while True:
                time.sleep(interval)
                live.update(render_top(fetch_fleet(url), source=url))
        except KeyboardInterrupt:
            pass


COMMANDS: list[click.Command] = [dashboard, top]
