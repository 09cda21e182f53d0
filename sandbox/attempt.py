"""One task attempt in one sandbox, start to finish, with no Ray in it.

workspace -> container create/start -> stream stdout/stderr to the archive (and an
optional callback) -> wait with the timeout -> collect exit code, oom, timeout, duration
and the diff into `DATA/archive/<batch>/<task>/<attempt>/` (result.json, stdout.log,
stderr.log, diff.patch) -> remove the container and the workspace in a `finally`,
whatever happened.

`hooks` (an `AttemptHooks`, optional) is the node's seam around the container: extra
read-only mounts and environment (the gateway's socket directory, the forwarder, the
agent's endpoint variables), a wrapper for the command (the forwarder starts first),
`on_created(container_id, workspace)` between create and start (activity capture sees
the first command) and `on_finished(container_id)` after the wait and before removal,
on every path (capture always stops before the container goes; once the sandbox has
exited it runs while the logs end and the diff is made). What `on_finished`
returns is kept as `AttemptResult.node_report`; its `stop_reason` (an outcome such as
`budget_exceeded`) overrides the outcome of a sandbox the node stopped on purpose.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

from accounting.errors import SandboxError, SandfleetError
from sandbox.backend import SandboxBackend, SandboxSpec, Stream, WaitResult
from sandbox.canaries import plant_canaries
from sandbox.container_spec import container_spec, sandbox_home, sandbox_labels, sandbox_name
from sandbox.liveness import current_owner
from sandbox.templates import Template
from sandbox.workspace import (
    DiffSummary,
    Workspace,
    collect_diff,
    prepare_workspace,
    remove_workspace,
    workspace_root,
)

__all__ = [
    "AttemptHooks",
    "AttemptOutcome",
    "AttemptResult",
    "OutputCallback",
    "archive_dir",
    "run_attempt_in_sandbox",
]

OutputCallback = Callable[[Stream, str], None]
_FOLLOW_JOIN_S = 60.0


class AttemptOutcome(StrEnum):
    """How an attempt ended."""

    SUCCEEDED = "succeeded"  # exit 0, no oom
    FAILED = "failed"  # the command exited non-zero
    OOM = "oom"  # the kernel's OOM killer struck inside the sandbox
    TIMEOUT = "timeout"  # killed at the timeout
    ERROR = "error"  # sandfleet could not run it (image, engine, workspace)
    BUDGET_EXCEEDED = "budget_exceeded"  # a budget cap refused it; the node stopped it


_STOP_REASONS = frozenset({AttemptOutcome.BUDGET_EXCEEDED.value})


@dataclass(frozen=True)
class AttemptHooks:
    """The node's additions to one sandbox (see the module doc); every part optional.

    `volumes` are docker SDK bind mounts (host path -> `bind`), always read-only, added
    to the workspace's and never replacing it;
    `env` is layered over the caller's env (the node's endpoint variables win);
    `wrap_command(argv)` returns the argv the container runs; `on_created` may raise
    (the attempt then ends as an error, cleaned up); `on_finished` returns a small,
    JSON-able dict.
    """

    volumes: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)
    wrap_command: Callable[[tuple[str, ...]], Sequence[str]] | None = None
    on_created: Callable[[str, Path], None] | None = None
    on_finished: Callable[[str], Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class AttemptResult:
    """Everything one attempt produced; also written as the archive's result.json."""

    batch: str
    task: str
    attempt: int
    team: str
    template: str
    image: str
    command: tuple[str, ...]
    outcome: AttemptOutcome
    exit_code: int | None
    oom: bool
    timed_out: bool
    timeout_s: float
    duration_s: float
    started_at: str
    archive_dir: str
    stdout_bytes: int
    stderr_bytes: int
    diff_sha256: str | None
    diff_bytes: int
    files_changed: int
    insertions: int
    deletions: int
    workspace_capped: bool
    notes: tuple[str, ...]
    error: str | None = None
    node_report: Mapping[str, Any] | None = None  # what hooks.on_finished returned

    def to_json(self) -> str:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["node_report"] = dict(self.node_report) if self.node_report is not None else None
        return json.dumps(data, indent=2, sort_keys=True) + "\n"


def archive_dir(data_dir: str | Path, batch: str, task: str, attempt: int) -> Path:
    """`DATA/archive/<batch>/<task>/<attempt>` (same naming rules as the workspace)."""
    ws = workspace_root(data_dir, batch, task, attempt)
    return Path(data_dir) / "archive" / ws.parent.parent.name / ws.parent.name / ws.name


class _Follower(threading.Thread):
    """Copies one output stream of a sandbox to a log file and, line by line, a callback."""

    def __init__(
        self,
        backend: SandboxBackend,
        sandbox_id: str,
        stream: Stream,
        sink: IO[bytes],
        on_output: OutputCallback | None,
    ) -> None:
        super().__init__(name=f"sandfleet-{stream}-{sandbox_id[:12]}", daemon=True)
        self.backend, self.sandbox_id, self.stream = backend, sandbox_id, stream
        self.sink, self.on_output = sink, on_output
        self.error: BaseException | None = None
        self.bytes = 0

    def run(self) -> None:
        pending = b""
        try:
            for chunk in self.backend.logs(self.sandbox_id, self.stream, follow=True):
                self.sink.write(chunk)
                self.bytes += len(chunk)
                if self.on_output is not None:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self.on_output(self.stream, line.decode(errors="replace"))
            if self.on_output is not None and pending:
                self.on_output(self.stream, pending.decode(errors="replace"))
        except BaseException as e:  # reported by the caller after join()
            self.error = e


class _Finishing(threading.Thread):
    """`hooks.on_finished(sandbox_id)`, in a thread once the sandbox exited (the node stops
    its capture while the logs end and the diff is made), or run inline on error paths."""

    def __init__(self, on_finished: Callable[[str], Mapping[str, Any]], sandbox_id: str) -> None:
        super().__init__(name=f"sandfleet-finish-{sandbox_id[:12]}", daemon=True)
        self.on_finished, self.sandbox_id = on_finished, sandbox_id
        self.report: Mapping[str, Any] | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.report = dict(self.on_finished(self.sandbox_id))
        except Exception as e:  # reported by the caller
            self.error = e

    def join_once(self) -> None:
        if self.ident is not None:  # started as a thread (not run inline)
            self.join()


def _outcome(waited: WaitResult) -> AttemptOutcome:
    if waited.timed_out:
        return AttemptOutcome.TIMEOUT
    if waited.oom:
        return AttemptOutcome.OOM
    return AttemptOutcome.SUCCEEDED if waited.exit_code == 0 else AttemptOutcome.FAILED


def run_attempt_in_sandbox(
    backend: SandboxBackend,
    template: Template,
    *,
    data_dir: str | Path,
    image: str,
    batch: str,
    task: str,
    attempt: int = 1,
    team: str = "default",
    command: Sequence[str] | None = None,
    repo: str | None = None,
    ref: str | None = None,
    workspace_dir: str | Path | None = None,
    timeout_s: float | None = None,
    env: Mapping[str, str] | None = None,
    on_output: OutputCallback | None = None,
    use_tmpfs: bool | None = None,
    hooks: AttemptHooks | None = None,
) -> AttemptResult:
    """Run one attempt in a fresh sandbox and archive what it produced.

    The command's failure, OOM or timeout is a result, not an exception. Errors that
    stop the attempt from running at all (image, engine, workspace) are written to the
    archive's result.json and then raised. The container and the workspace are removed
    in every case (after `hooks.on_finished`, when `hooks.on_created` ran).
    """
    hooks = hooks or AttemptHooks()
    timeout = float(timeout_s if timeout_s is not None else template.timeout)
    argv = tuple(command) if command else tuple(template.agent_command)
    owner = current_owner().token()
    archive = archive_dir(data_dir, batch, task, attempt)
    archive.mkdir(parents=True, exist_ok=True)
    started_at = datetime.now(UTC).isoformat()
    ws: Workspace | None = None
    sandbox_id: str | None = None
    followers: list[_Follower] = []
    sinks: list[IO[bytes]] = []
    waited: WaitResult | None = None
    watched = False  # hooks.on_created returned: on_finished is owed
    finishing: _Finishing | None = None  # on_finished, once the sandbox exited
    report: Mapping[str, Any] | None = None
    diff: DiffSummary | None = None
    error: BaseException | None = None
    t0 = time.monotonic()
    try:
        ws = prepare_workspace(
            data_dir, batch=batch, task=task, attempt=attempt, owner=owner,
            size_bytes=template.resources.workspace_size, repo=repo, ref=ref,
            copy_from=workspace_dir if repo is None else None, use_tmpfs=use_tmpfs,
        )  # fmt: skip
        labels = sandbox_labels(batch=batch, task=task, attempt=attempt, team=team,
                                owner=owner, template=template.name)  # fmt: skip
        run_argv = tuple(hooks.wrap_command(argv)) if hooks.wrap_command else argv
        run_env = {**(env or {}), **hooks.env}
        canaries = plant_canaries(ws.path, template.canaries, sandbox_home(template, run_env))
        kwargs = container_spec(
            template, image=image, labels=labels, workspace_host_path=str(ws.path),
            name=sandbox_name(batch, task, attempt, uuid.uuid4().hex[:8]),
            env=run_env, command=run_argv, canaries=canaries,
        )  # fmt: skip
        extra = {src: {"bind": m["bind"], "mode": "ro"} for src, m in hooks.volumes.items()}
        kwargs["volumes"] = {**extra, **kwargs["volumes"]}  # the workspace is never replaced
        sandbox_id = backend.create(SandboxSpec(kwargs))
        if hooks.on_created is not None:
            hooks.on_created(sandbox_id, ws.path)
            watched = True
        backend.start(sandbox_id)
        for stream in ("stdout", "stderr"):
            sink = (archive / f"{stream}.log").open("wb")
            sinks.append(sink)
            follower = _Follower(backend, sandbox_id, stream, sink, on_output)
            follower.start()
            followers.append(follower)
        remaining = max(timeout - (time.monotonic() - t0), 0.001)
        waited = backend.wait(sandbox_id, timeout=remaining)
        if watched and hooks.on_finished is not None:  # the capture stops while the diff is made
            finishing = _Finishing(hooks.on_finished, sandbox_id)
            finishing.start()
        for follower in followers:
            follower.join(_FOLLOW_JOIN_S)
            if follower.is_alive():
                raise SandboxError(
                    f"the {follower.stream} of sandbox {sandbox_id[:12]} did not end "
                    f"{_FOLLOW_JOIN_S:.0f}s after the sandbox exited; fix: check the engine"
                )
            if follower.error is not None:
                raise follower.error
        diff = collect_diff(ws, archive / "diff.patch")
    except BaseException as e:  # recorded in result.json, then re-raised
        error = e
        raise
    finally:
        cleanup_errors: list[str] = []
        if finishing is None and watched and sandbox_id is not None and hooks.on_finished:
            finishing = _Finishing(hooks.on_finished, sandbox_id)
            finishing.run()  # here: before the container goes (its cgroup is read one last time)
        if finishing is not None:
            finishing.join_once()
            if finishing.error is not None:  # recorded; the container must still go
                cleanup_errors.append(f"the node's on_finished hook failed: {finishing.error!r}")
            report = finishing.report
        cleanup_errors += _cleanup(backend, sandbox_id, ws, sinks, exited=waited is not None)
        result = _result(
            batch, task, attempt, team, template, image, argv, timeout, started_at, archive,
            followers, waited, diff, ws, error, cleanup_errors, report,
        )  # fmt: skip
        (archive / "result.json").write_text(result.to_json())
    if cleanup_errors:
        raise SandboxError("; ".join(cleanup_errors))
    return result


def _cleanup(
    backend: SandboxBackend,
    sandbox_id: str | None,
    ws: Workspace | None,
    sinks: list[IO[bytes]],
    *,
    exited: bool = False,
) -> list[str]:
    """Remove the container and the workspace; close the logs. Returns what failed.

    A container that may still run goes first (nothing of it may outlive its workspace);
    one that has `exited` uses it no more, so both go at once."""
    problems: list[str] = []

    def remove_container() -> None:
        if sandbox_id is not None:
            try:
                backend.remove(sandbox_id)
            except SandfleetError as e:  # must not hide the error that brought us here
                problems.append(f"could not remove sandbox {sandbox_id[:12]}: {e}")

    alongside: threading.Thread | None = None
    if exited and sandbox_id is not None and ws is not None:
        alongside = threading.Thread(target=remove_container, name="sandfleet-remove")
        alongside.start()
    else:
        remove_container()
    try:
        if ws is not None:
            try:
                remove_workspace(ws.root)
            except SandfleetError as e:
                problems.append(str(e))
    finally:
        if alongside is not None:
            alongside.join()
        for sink in sinks:
            sink.close()
    return problems


def _result(
    batch: str,
    task: str,
    attempt: int,
    team: str,
    template: Template,
    image: str,
    argv: tuple[str, ...],
    timeout: float,
    started_at: str,
    archive: Path,
    followers: list[_Follower],
    waited: WaitResult | None,
    diff: DiffSummary | None,
    ws: Workspace | None,
    error: BaseException | None,
    cleanup_errors: list[str],
    report: Mapping[str, Any] | None = None,
) -> AttemptResult:
    sizes = {f.stream: f.bytes for f in followers}
    message = str(error) if error is not None else None
    if cleanup_errors:
        message = "; ".join(filter(None, [message, *cleanup_errors]))
    outcome = _outcome(waited) if waited is not None and error is None else AttemptOutcome.ERROR
    stop_reason = (report or {}).get("stop_reason")
    if stop_reason in _STOP_REASONS and outcome is not AttemptOutcome.ERROR:
        outcome = AttemptOutcome(stop_reason)
    return AttemptResult(
        batch=batch,
        task=task,
        attempt=attempt,
        team=team,
        template=template.name,
        image=image,
        command=argv,
        outcome=outcome,
        exit_code=waited.exit_code if waited else None,
        oom=waited.oom if waited else False,
        timed_out=waited.timed_out if waited else False,
        timeout_s=timeout,
        duration_s=waited.duration_s if waited else 0.0,
        started_at=started_at,
        archive_dir=str(archive),
        stdout_bytes=sizes.get("stdout", 0),
        stderr_bytes=sizes.get("stderr", 0),
        diff_sha256=diff.sha256 if diff else None,
        diff_bytes=diff.size_bytes if diff else 0,
        files_changed=diff.files_changed if diff else 0,
        insertions=diff.insertions if diff else 0,
        deletions=diff.deletions if diff else 0,
        workspace_capped=ws.size_capped if ws else False,
        notes=ws.notes if ws else (),
        error=message,
        node_report=report,
    )
