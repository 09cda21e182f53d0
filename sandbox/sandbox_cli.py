"""`sandfleet sandbox run | ls | reap`: one sandbox by hand, and what is left of them."""

from __future__ import annotations

import sys
import uuid
from datetime import UTC, datetime

import click

__all__ = ["COMMANDS", "sandbox_group"]

EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_OOM = 137  # 128 + SIGKILL


@click.group("sandbox")
def sandbox_group() -> None:
    """Hardened sandboxes: run one, list them, reap the dead."""


@sandbox_group.command(
    "run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option("--template", "template_name", required=True, help="Template name or YAML path.")
@click.option("--workspace", "workspace_dir", type=click.Path(exists=True, file_okay=False),
              help="Copy this directory into /workspace.")  # fmt: skip
@click.option("--repo", help="Clone this repository (path or URL) into /workspace.")
@click.option("--ref", help="Branch, tag or commit of --repo (default: its HEAD).")
@click.option("--timeout", "timeout_s", type=float, help="Seconds (default: the template's).")
@click.option("--data-dir", help="Data directory (default $SANDFLEET_DATA or ./sandfleet-data).")
@click.option("--batch", default="adhoc", show_default=True, help="Batch id for labels/archive.")
@click.option("--task", help="Task id (default: run-<time>-<random>).")
@click.option("--team", default="default", show_default=True, help="Team label.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def sandbox_run(
    template_name: str,
    workspace_dir: str | None,
    repo: str | None,
    ref: str | None,
    timeout_s: float | None,
    data_dir: str | None,
    batch: str,
    task: str | None,
    team: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (after `--`) in a fresh sandbox; stream its output; exit with its code.

    Exit 124 when it timed out, 137 when the OOM killer struck; the archive (result.json,
    stdout.log, stderr.log, diff.patch) is kept under DATA/archive/.
    """
    from accounting.errors import ConfigError
    from accounting.paths import resolve_data_dir
    from accounting.units import format_bytes
    from sandbox.attempt import run_attempt_in_sandbox
    from sandbox.docker_backend import DockerBackend
    from sandbox.images import image_ref
    from sandbox.templates import load_template

    if workspace_dir and repo:
        raise ConfigError("give --workspace or --repo, not both")
    if ref and not repo:
        raise ConfigError("--ref needs --repo")
    template = load_template(template_name)
    task_id = task or f"run-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    backend = DockerBackend()
    try:
        result = run_attempt_in_sandbox(
            backend, template, data_dir=resolve_data_dir(data_dir), image=image_ref(template.image),
            batch=batch, task=task_id, team=team, command=command or None, repo=repo, ref=ref,
            workspace_dir=workspace_dir, timeout_s=timeout_s,
            on_output=lambda stream, line: click.echo(line, err=stream == "stderr"),
        )  # fmt: skip
    finally:
        backend.close()
    for note in result.notes:
        click.echo(f"sandfleet: note: {note}", err=True)
    if result.timed_out:
        click.echo(f"sandfleet: timed out after {result.timeout_s:g} s", err=True)
        code = EXIT_TIMEOUT
    elif result.oom:
        limit = format_bytes(template.resources.memory)
        click.echo(f"sandfleet: killed: out of memory (limit {limit})", err=True)
        code = EXIT_OOM
    else:
        code = result.exit_code if result.exit_code is not None else 1
    click.echo(
        f"sandfleet: {result.files_changed} file(s) changed (+{result.insertions} "
        f"-{result.deletions}); archive: {result.archive_dir}",
        err=True,
    )
    sys.exit(code)  # SystemExit: click's non-standalone main would swallow ctx.exit's code


@sandbox_group.command("ls")
@click.option("--data-dir", help="Data directory (default $SANDFLEET_DATA or ./sandfleet-data).")
def sandbox_ls(data_dir: str | None) -> None:
    """Every sandfleet container and workspace on this node, and whether its owner lives."""
    from accounting.paths import resolve_data_dir
    from sandbox.container_spec import (
        LABEL_ATTEMPT,
        LABEL_BATCH,
        LABEL_MANAGED,
        LABEL_OWNER,
        LABEL_TASK,
    )
    from sandbox.docker_backend import DockerBackend
    from sandbox.liveness import owner_is_live
    from sandbox.reaper import workspace_roots
    from sandbox.workspace import read_owner

    backend = DockerBackend()
    try:
        boxes = backend.list({LABEL_MANAGED: "1"})
    finally:
        backend.close()
    click.echo(f"{len(boxes)} container(s)")
    for box in boxes:
        lb = box.labels
        live = "live" if owner_is_live(lb.get(LABEL_OWNER)) else "dead"
        where = f"{lb.get(LABEL_BATCH)}/{lb.get(LABEL_TASK)}/{lb.get(LABEL_ATTEMPT)}"
        click.echo(f"  {box.id[:12]}  {box.status.value:8} {live:5} {where}  {box.name}")
    roots = list(workspace_roots(resolve_data_dir(data_dir)))
    click.echo(f"{len(roots)} workspace(s)")
    for root in roots:
        live = "live" if owner_is_live(read_owner(root)) else "dead"
        click.echo(f"  {live:5} {root}")


@sandbox_group.command("reap")
@click.option("--data-dir", help="Data directory (default $SANDFLEET_DATA or ./sandfleet-data).")
@click.option("--batch", help="Only this batch's containers and workspaces.")
def sandbox_reap(data_dir: str | None, batch: str | None) -> None:
    """Remove every sandfleet container and workspace whose attempt is not live."""
    from accounting.paths import resolve_data_dir
    from sandbox.container_spec import LABEL_BATCH
    from sandbox.docker_backend import DockerBackend
    from sandbox.reaper import reap

    backend = DockerBackend()
    try:
        labels = {LABEL_BATCH: batch} if batch else None
        report = reap(backend, resolve_data_dir(data_dir), labels=labels)
    finally:
        backend.close()
    for name in report.containers_removed:
        click.echo(f"removed container {name}")
    for path in report.workspaces_removed:
        click.echo(f"removed workspace {path}")
    click.echo(
        f"reaped {len(report.containers_removed)} container(s), "
        f"{len(report.workspaces_removed)} workspace(s); kept {report.kept} live"
    )
    for failure in report.failures:
        click.echo(f"error: {failure}", err=True)
    sys.exit(1 if report.failures else 0)


COMMANDS: list[click.Command] = [sandbox_group]
