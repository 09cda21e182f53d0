"""`sandfleet run|submit|status|cancel|resume|logs|diff`: the commands users live in.

Exit status of `run` and `resume`: 0 when every task succeeded, 1 when any did not, 2 on
invalid input (a bad spec, template, flag or quota, or an estimate over the batch's cap
without `--force`; nothing was started). Every command takes `--json` and then prints
one JSON document instead of tables and bars. `run` and `resume` start the cluster's
Monitor and print its dashboard URL first (on stderr), unless `--no-dashboard`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from accounting.errors import ConfigError, ImageError
from accounting.paths import resolve_data_dir
from scheduler.plan import Backend

__all__ = ["COMMANDS"]

_data_dir = click.option(
    "--data-dir", default=None, help="Ledger root (default $SANDFLEET_DATA or ./sandfleet-data)."
)
_address = click.option(
    "--address", default=None, help="Ray cluster address (default: start a local one)."
)
_backend = click.option(
    "--backend",
    type=click.Choice([b.value for b in Backend]),
    default=None,
    help="docker (default) or fake: the in-memory test backend, no containers.",
)
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON, no bars or tables.")
_dashboard_port = click.option(
    "--dashboard-port",
    type=click.IntRange(min=0, max=65535),
    default=None,
    help="Port of the live dashboard and /metrics (default 8266; 0: any free port).",
)
_dashboard_host = click.option(
    "--dashboard-host",
    default=None,
    help="Address the dashboard and /metrics listen on (default 127.0.0.1; 0.0.0.0 for a "
    "head node reached from other machines: it has no login, keep it on a trusted network).",
)
_no_dashboard = click.option(
    "--no-dashboard",
    is_flag=True,
    help="Start no Monitor: no live dashboard, metrics or streaming rule actions.",
)
_policies = click.option(
    "--policies",
    "policies_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Policies file (default configs/policies.yaml).",
)


def _settings(**kw: Any) -> Any:
    from scheduler.driver import Settings

    backend = kw.pop("backend", None)
    dashboard = not kw.pop("no_dashboard", True)
    return Settings(
        data_dir=resolve_data_dir(kw.pop("data_dir", None)),
        backend=Backend(backend or Backend.DOCKER.value),
        monitor=True,  # the streaming rules act on every run, dashboard or not
        dashboard=dashboard,
        **{k: v for k, v in kw.items() if v is not None},
    )


def _announce(url: str) -> None:
    click.echo(f"dashboard: {url}", err=True)


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def _check_images(plan: Any, settings: Any) -> None:
    """With Docker on this machine, a missing image is refused before anything starts."""
    if plan.backend is not Backend.DOCKER or settings.address:
        return
    from sandbox.images import image_exists

    missing = sorted({ref for ref in plan.images.values() if not image_exists(ref)})
    if missing:
        raise ImageError(
            f"image(s) {', '.join(missing)} not built on this machine "
            "(fix: run `sandfleet images build`, or `make setup`)"
        )


def _follow(
    batch_id: str, as_json: bool, work: Callable[[Callable[[dict[str, Any]], None]], dict]
) -> None:
    """Run `work(on_progress)` with a live view (or quietly for --json); exit 0/1."""
    from rich.console import Console

    from scheduler.driver import exit_code
    from scheduler.progress import BatchProgress, summary_table

    if as_json:
        final = work(lambda _: None)
        _echo_json({"batch": batch_id, **final, "exit_code": exit_code(final)})
    else:
        with BatchProgress(batch_id) as view:
            final = work(view.update)
        Console().print(summary_table(batch_id, final))
    click.get_current_context().exit(exit_code(final))


@click.command("run")
@click.argument("batch", type=click.Path(dir_okay=False))
@_data_dir
@_address
@_backend
@_policies
@click.option("--slots", type=click.IntRange(min=1), help="Embedded cluster: sandbox slots.")
@click.option("--max-slots", type=click.IntRange(min=0), help="Autoscaling cap, in sandboxes.")
@click.option(
    "--cluster-config",
    type=click.Path(dir_okay=False, exists=True),
    help="Ray cluster YAML whose max size caps the autoscaler request.",
)
@_dashboard_host
@_dashboard_port
@_no_dashboard
@click.option("--force", is_flag=True, help="Run even when the estimate exceeds the cap.")
@click.option(
    "--again",
    is_flag=True,
    help="Run a batch that is already in the ledger anew, as <id>-<UTC time>.",
)
@_json
def run_cmd(batch: str, as_json: bool, force: bool, again: bool, **kw: Any) -> None:
    """Run BATCH (a YAML file) to completion, with live progress and a final summary."""
    from datetime import UTC, datetime

    from scheduler import driver

    settings = _settings(**kw)
    tag = datetime.now(UTC).strftime("%Y%m%dT%H%M%S") if again else None
    plan = driver.prepare(batch, settings, again=tag)
    _check_images(plan, settings)
    refusal = driver.refusal_of_estimate(plan, settings)
    if refusal and not force:
        raise ConfigError(refusal)
    if refusal:
        click.echo(f"warning (--force): {refusal}", err=True)
    _follow(plan.batch_id, as_json, lambda cb: driver.run(plan, settings, cb, _announce))


@click.command("resume")
@click.argument("batch_id", metavar="BATCH")
@_data_dir
@_address
@_backend
@_policies
@click.option("--slots", type=click.IntRange(min=1), help="Embedded cluster: sandbox slots.")
@_dashboard_host
@_dashboard_port
@_no_dashboard
@_json
def resume_cmd(batch_id: str, as_json: bool, **kw: Any) -> None:
    """Finish BATCH from the ledger after its driver or scheduler was lost."""
    from scheduler import driver
    from scheduler.history import submitted_batches

    backend = kw.get("backend")
    settings = _settings(**kw)
    if not submitted_batches(settings.data_dir, batch_id):
        raise ConfigError(
            f"batch {batch_id!r} is not in the ledger under {settings.data_dir} "
            "(fix: check the id with `sandfleet status --data-dir ...`)"
        )
    _follow(
        batch_id,
        as_json,
        lambda cb: driver.resume(
            batch_id, settings, backend=backend, on_progress=cb, on_dashboard=_announce
        ),
    )


@click.command("submit")
@click.argument("batch", type=click.Path(dir_okay=False))
@click.option("--address", required=True, help="The head's job server, http://HEAD:8265.")
@click.option(
    "--data-dir", default="~/sandfleet-data", show_default=True, help="Ledger root on the cluster."
)
@_backend
@_json
def submit_cmd(batch: str, address: str, data_dir: str, backend: str | None, as_json: bool) -> None:
    """Run BATCH on a cluster through Ray's Job Submission API; print the job id."""
    from ray.job_submission import JobSubmissionClient

    from accounting.policies import load_policies
    from scheduler.driver import job_request
    from scheduler.plan import plan_batch
    from scheduler.spec import load_batch

    kind = Backend(backend or Backend.DOCKER.value)
    spec = load_batch(batch)
    plan_batch(spec, backend=kind, policies=load_policies())  # refuse bad input here, exit 2
    request = job_request(batch, batch_id=spec.batch_id, data_dir=data_dir, backend=kind,
                          nonce=uuid.uuid4().hex[:8])  # fmt: skip

    job_id = JobSubmissionClient(address).submit_job(**request)
    if as_json:
        _echo_json({"job_id": job_id, "batch": spec.batch_id, "address": address})
    else:
        click.echo(job_id)


@click.command("status")
@click.argument("batch_id", metavar="[BATCH]", required=False)
@_data_dir
@click.option("--address", default=None, help="Ask the cluster's live scheduler instead.")
@_json
def status_cmd(
    batch_id: str | None, data_dir: str | None, address: str | None, as_json: bool
) -> None:
    """Tasks per state of each batch (or BATCH), from the ledger or the live scheduler."""
    from rich.console import Console

    from scheduler.progress import states_table

    if address:
        from scheduler.driver import Settings, live_status

        live = live_status(Settings(data_dir=resolve_data_dir(data_dir), address=address), batch_id)
        rows = [{"batch": b, **v} for b, v in live["batches"].items()]
    else:
        rows = _ledger_status(resolve_data_dir(data_dir), batch_id)
    if batch_id and not rows:
        raise ConfigError(f"no batch {batch_id!r} (fix: run `sandfleet status` to list them)")
    if as_json:
        _echo_json(rows)
    else:
        Console().print(states_table(rows))


def _ledger_status(data_dir: str, batch_id: str | None) -> list[dict[str, Any]]:
    from scheduler.history import batch_states, submitted_batches
    from scheduler.state import TERMINAL_STATES

    terminal = {s.value for s in TERMINAL_STATES}
    counts: dict[str, dict[str, int]] = {}
    for row in batch_states(data_dir, batch_id):
        counts.setdefault(row["batch"], {})[row["state"]] = int(row["tasks"])
    rows = []
    for b in submitted_batches(data_dir, batch_id):
        states = counts.get(b["batch"], {})
        done = sum(n for s, n in states.items() if s in terminal) == b["tasks"]
        rows.append({"batch": b["batch"], "team": b["team"], "total": int(b["tasks"]),
                     "states": states, "done": done})  # fmt: skip
    return rows


@click.command("cancel")
@click.argument("target", metavar="BATCH|TASK")
@click.option("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS).")
@_json
def cancel_cmd(target: str, address: str | None, as_json: bool) -> None:
    """Cancel a batch or a task (BATCH/TASK when the id is in several batches)."""
    from scheduler.driver import Settings, cancel

    done = cancel(target, Settings(data_dir="", address=address))
    if as_json:
        _echo_json(done)
    else:
        click.echo(
            f"{target}: {done['cancelled_queued']} queued task(s) cancelled, "
            f"{done['cancelling_running']} running attempt(s) being stopped"
        )


def _attempt_dir(task: str, batch: str | None, attempt: int | None, data_dir: str) -> tuple:
    from sandbox.attempt import archive_dir
    from scheduler.history import find_attempts

    if batch is None and "/" in task:
        batch, task = task.split("/", 1)
    found = find_attempts(data_dir, task, batch)
    if not found:
        raise ConfigError(f"no task {task!r} in the ledger under {data_dir} (fix: check the id)")
    if len(found) > 1:
        names = ", ".join(f["batch"] for f in found)
        raise ConfigError(f"task {task!r} is in batches {names} (fix: pass --batch or BATCH/TASK)")
    row = found[0]
    number = attempt or int(row["attempt"])
    path = archive_dir(data_dir, row["batch"], task, number)
    if not path.is_dir():
        raise ConfigError(
            f"task {task} attempt {number}: no archive at {path} (fix: pick an attempt that "
            f"ran, 1..{row['attempt']}, with --attempt)"
        )
    return row["batch"], task, number, path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


_task_options = [
    click.argument("task", metavar="TASK"),
    click.option("--batch", default=None, help="The batch, when the task id is in several."),
    click.option("--attempt", type=click.IntRange(min=1), default=None, help="Default: last."),
    _data_dir,
    _json,
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


@click.command("logs")
@_with(_task_options)
def logs_cmd(task: str, batch: str | None, attempt: int | None, data_dir: str | None,
             as_json: bool) -> None:  # fmt: skip
    """A task attempt's stdout and stderr, from the archive."""
    b, t, n, path = _attempt_dir(task, batch, attempt, resolve_data_dir(data_dir))
    out, err = _read(path / "stdout.log"), _read(path / "stderr.log")
    if as_json:
        _echo_json({"batch": b, "task": t, "attempt": n, "stdout": out, "stderr": err})
        return
    click.echo(out, nl=False)
    click.echo(err, nl=False, err=True)


@click.command("diff")
@_with(_task_options)
def diff_cmd(task: str, batch: str | None, attempt: int | None, data_dir: str | None,
             as_json: bool) -> None:  # fmt: skip
    """A task attempt's diff (binary-safe git patch), from the archive."""
    b, t, n, path = _attempt_dir(task, batch, attempt, resolve_data_dir(data_dir))
    patch = _read(path / "diff.patch")
    if as_json:
        _echo_json({"batch": b, "task": t, "attempt": n, "diff": patch})
        return
    click.echo(patch, nl=False)


COMMANDS: list[click.Command] = [
    run_cmd, submit_cmd, status_cmd, cancel_cmd, resume_cmd, logs_cmd, diff_cmd,
]  # fmt: skip
