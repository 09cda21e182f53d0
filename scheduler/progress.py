"""What `sandfleet run|resume|status` show: a live progress view and summary tables (rich).

`BatchProgress` turns the scheduler's status snapshots into one bar per state of the
batch and one line per team (running / queued); `summary_table` and `states_table` are
the final and the `status` tables. With `--json` none of this is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Final

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from accounting.schemas import TaskState

__all__ = ["STATE_ORDER", "BatchProgress", "states_table", "summary_table"]

STATE_ORDER: Final = tuple(s.value for s in TaskState)
_COLOURS: Final = {
    "queued": "grey50",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "oom": "magenta",
    "timed_out": "yellow",
    "cancelled": "bright_black",
    "budget_exceeded": "bright_red",
    "stopped_by_rule": "orange3",
}


class BatchProgress:
    """A live view of one batch: a bar per state, a line per team."""

    def __init__(self, batch_id: str, console: Console | None = None) -> None:
        self.batch_id = batch_id
        self.console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._bars: dict[str, Any] = {}
        self._teams: dict[str, Any] = {}

    def __enter__(self) -> BatchProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, status: Mapping[str, Any]) -> None:
        batch = status.get("batches", {}).get(self.batch_id)
        if batch is None:
            return
        total = int(batch["total"])
        states = batch.get("states", {})
        for state in STATE_ORDER:
            count = int(states.get(state, 0))
            if state not in self._bars and not count:
                continue
            if state not in self._bars:
                colour = _COLOURS.get(state, "white")
                self._bars[state] = self._progress.add_task(
                    f"[{colour}]{state}", total=total, completed=0
                )
            self._progress.update(self._bars[state], completed=count, total=total)
        for team, counts in sorted(status.get("teams", {}).items()):
            text = f"team {team}: {counts['running']} running, {counts['queued']} queued"
            if team not in self._teams:
                self._teams[team] = self._progress.add_task(text, total=None)
            self._progress.update(self._teams[team], description=text)


def summary_table(batch_id: str, batch: Mapping[str, Any]) -> Table:
    """The final table of a run: tasks per state."""
    table = Table(title=f"batch {batch_id} (team {batch.get('team', '')})")
    table.add_column("state")
    table.add_column("tasks", justify="right")
    table.add_column("share", justify="right")
    total = max(int(batch["total"]), 1)
    for state in STATE_ORDER:
        count = int(batch["states"].get(state, 0))
        if count:
            table.add_row(state, str(count), f"{100 * count / total:.1f}%")
    table.add_row("[bold]total", f"[bold]{batch['total']}", "")
    return table


def states_table(rows: Iterable[Mapping[str, Any]]) -> Table:
    """`sandfleet status`: one row per batch with its count per state."""
    rows = list(rows)
    seen = {s for r in rows for s in r["states"]}
    states = [s for s in STATE_ORDER if s in seen]
    table = Table(title="batches")
    for column in ("batch", "team", "tasks", *states, "done"):
        table.add_column(column, justify="right" if column not in ("batch", "team") else "left")
    for r in rows:
        cells = [str(r["states"].get(s, 0)) for s in states]
        table.add_row(r["batch"], r["team"], str(r["total"]), *cells, "yes" if r["done"] else "no")
    return table
