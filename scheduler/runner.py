"""`run_attempt`: the Ray task that runs one attempt of one task in one sandbox.

The scheduler starts it with the template's resources (`attempt_options`: `num_cpus`,
`memory`, one `sandbox_slots`) and `max_retries=0`: Ray never re-runs it behind the
scheduler's back; a lost node or worker comes back to the scheduler as an exception,
which starts a new attempt with its own number (see `scheduler.state`).

On the node it calls `sandbox.attempt.run_attempt_in_sandbox` with a `DockerBackend`, or
the in-memory `FakeBackend` when the batch was started with `--backend fake`, and
returns a small dict (`outcome`, `exit_code`, `duration_s`, the diff's size and hash,
the node, ...). The agent's own failure, OOM and timeout are results; an engine,
image or workspace error becomes `outcome: error` with its type (the scheduler retries
it elsewhere).

The attempt runs in a thread while the task's main thread waits, so a (non-force)
`ray.cancel` — a KeyboardInterrupt in the main thread — stops the attempt's sandbox at
once; the attempt's own `finally` then removes the container and the workspace before
the task ends.

`sweep_sandboxes` removes what a lost or cancelled attempt may have left on a node:
its containers (by label) and its workspace.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from accounting.errors import SandfleetError
from sandbox.attempt import AttemptHooks, AttemptResult, run_attempt_in_sandbox
from sandbox.backend import SandboxBackend
from sandbox.container_spec import LABEL_ATTEMPT, LABEL_BATCH, LABEL_TASK
from sandbox.templates import Template
from scheduler.autoscale import SLOT_RESOURCE
from scheduler.plan import Backend, Plan
from scheduler.spec import TaskSpec

__all__ = [
    "AttemptRequest",
    "attempt_options",
    "attempt_request",
    "execute",
    "on_node",
    "run_attempt",
    "sweep_sandboxes",
    "workspace_source",
]

log = logging.getLogger(__name__)

_POLL_S: Final = 0.2
_CANCEL_DEADLINE_S: Final = 60.0
_ERROR_CHARS: Final = 2000
_backends: dict[str, SandboxBackend] = {}
_schedulers: dict[str, tuple[str, Any]] = {}
_backends_lock = threading.Lock()


@dataclass(frozen=True)
class AttemptRequest:
    """Everything one attempt needs on the node (picklable, a few KB)."""

    batch: str
    task: str
    attempt: int
    team: str
    template: Template
    image: str
    command: tuple[str, ...] | None
    repo: str
    ref: str
    timeout_s: float
    env: tuple[tuple[str, str], ...]
    data_dir: str
    backend: Backend
    task_type: str = ""


def attempt_request(plan: Plan, task: TaskSpec, attempt: int, data_dir: str) -> AttemptRequest:
    """The request for attempt `attempt` of `task` (a task of `plan`)."""
    env = dict(task.env)
    env.update(
        SANDFLEET_BATCH=task.batch,
        SANDFLEET_TASK=task.task_id,
        SANDFLEET_ATTEMPT=str(attempt),
        SANDFLEET_TEAM=task.team,
    )
    if task.prompt:
        env["SANDFLEET_PROMPT"] = task.prompt
    if task.model:
        env["SANDFLEET_MODEL"] = task.model
    return AttemptRequest(
        batch=task.batch,
        task=task.task_id,
        attempt=attempt,
        team=task.team,
        template=plan.templates[task.template],
        image=plan.images[task.template],
        command=task.command,
        repo=task.repo,
        ref=task.ref,
        timeout_s=float(task.timeout_s),
        env=tuple(sorted(env.items())),
        data_dir=data_dir,
        backend=plan.backend,
        task_type=task.task_type,
    )


def attempt_options(
    template: Template, *, name: str = "", slot_resource: str = SLOT_RESOURCE
) -> dict[str, Any]:
    """`run_attempt.options(...)` for a template: its CPUs and memory, one sandbox slot."""
    options: dict[str, Any] = {
        "num_cpus": template.resources.cpus,
        "memory": template.resources.memory,
        "resources": {slot_resource: 1},
        "max_retries": 0,
    }
    if name:
        options["name"] = name
    return options


def on_node(node_id: str | None, *, soft: bool = True) -> dict[str, Any]:
    """`.options(...)` that place a task on `node_id` (anywhere when None)."""
    if not node_id:
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=soft)}


def workspace_source(repo: str) -> tuple[str | None, str | None]:
    """(repo to clone, directory to copy): a local folder that is not a git repository is
    copied as the workspace; anything else (a URL, a repository) is cloned."""
    if "://" in repo or "@" in repo.split("/", 1)[0]:
        return repo, None
    path = Path(repo)
    if not path.is_dir():
        return repo, None  # let git say what is wrong with it
    if (path / ".git").exists() or ((path / "HEAD").is_file() and (path / "objects").is_dir()):
        return repo, None
    return None, repo


def _backend(kind: Backend) -> SandboxBackend:
    if kind is Backend.FAKE:
        from sandbox.fake_backend import FakeBackend

        return FakeBackend()  # in-memory: one per attempt, nothing to share
    with _backends_lock:
        backend = _backends.get(kind.value)
        if backend is None:
            from sandbox.docker_backend import DockerBackend

            backend = _backends[kind.value] = DockerBackend()
        return backend


def _labels(request: AttemptRequest) -> dict[str, str]:
    return {
        LABEL_BATCH: request.batch,
        LABEL_TASK: request.task,
        LABEL_ATTEMPT: str(request.attempt),
    }


NodeHooks = Callable[[], contextlib.AbstractContextManager[AttemptHooks | None]]
"""Opens the node's side of an attempt (gateway channel, capture) and closes it after."""


def _metered(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the node metered for the attempt (gateway and capture), for the tasks row."""
    r = report or {}
    return {
        "costs": {
            "compute_nusd": int(r.get("cost_compute_nusd") or 0),
            "llm_nusd": int(r.get("cost_llm_nusd") or 0),
            "network_nusd": int(r.get("cost_network_nusd") or 0),
            "storage_nusd": int(r.get("cost_storage_nusd") or 0),
        },
        "tokens_input": int(r.get("tokens_input") or 0),
        "tokens_output": int(r.get("tokens_output") or 0),
        "llm_calls": int(r.get("llm_calls") or 0),
    }


def _result(result: AttemptResult, node: str) -> dict[str, Any]:
    report = dict(result.node_report) if result.node_report else None
    return {
        **_metered(report),
        "node_report": report,
        "outcome": result.outcome.value,
        "exit_code": result.exit_code,
        "oom": result.oom,
        "timed_out": result.timed_out,
        "timeout_s": result.timeout_s,
        "duration_s": result.duration_s,
        "started_at": result.started_at,
        "archive_dir": result.archive_dir,
        "diff_sha256": result.diff_sha256,
        "files_changed": result.files_changed,
        "insertions": result.insertions,
        "deletions": result.deletions,
        "stdout_bytes": result.stdout_bytes,
        "stderr_bytes": result.stderr_bytes,
        "error": (result.error or "")[:_ERROR_CHARS] or None,
        "error_type": None,
        "node": node,
        "host": socket.gethostname(),
    }


def _error(error: SandfleetError, request: AttemptRequest, node: str) -> dict[str, Any]:
    return {
        **_metered(None),
        "node_report": None,
        "outcome": "error",
        "exit_code": None,
        "oom": False,
        "timed_out": False,
        "timeout_s": request.timeout_s,
        "duration_s": 0.0,
        "error": str(error)[:_ERROR_CHARS],
        "error_type": type(error).__name__,
        "node": node,
        "host": socket.gethostname(),
    }


def _stop_sandboxes(backend: SandboxBackend, request: AttemptRequest) -> None:
    """Kill the attempt's running sandbox(es); its `finally` removes them."""
    for info in backend.list(_labels(request)):
        try:
            backend.stop(info.id)
        except SandfleetError as e:  # gone meanwhile, or the engine hiccuped: try again
            log.warning("cancel of %s/%s: stop %s: %s", request.batch, request.task, info.name, e)


def execute(
    backend: SandboxBackend,
    request: AttemptRequest,
    node: str = "",
    node_hooks: NodeHooks | None = None,
) -> dict[str, Any]:
    """Run the attempt in a thread; on KeyboardInterrupt (a cancel) stop it, then re-raise.

    `node_hooks` opens the node's gateway channel and capture around the attempt."""
    repo, copy_from = workspace_source(request.repo)
    outcome: dict[str, Any] = {}
    finished = threading.Event()  # not thread.is_alive(): a KeyboardInterrupt inside
    # Thread.join marks the thread stopped while it still runs (CPython bpo-45274)

    def work() -> None:
        try:
            with node_hooks() if node_hooks else contextlib.nullcontext() as hooks:
                outcome["result"] = run_attempt_in_sandbox(
                    backend, request.template, data_dir=request.data_dir, image=request.image,
                    batch=request.batch, task=request.task, attempt=request.attempt,
                    team=request.team, command=request.command, repo=repo,
                    ref=request.ref if repo is not None else None, workspace_dir=copy_from,
                    timeout_s=request.timeout_s, env=dict(request.env),
                    use_tmpfs=False if request.backend is Backend.FAKE else None, hooks=hooks,
                )  # fmt: skip
        except BaseException as e:  # handed to the task's thread below
            outcome["error"] = e
        finally:
            finished.set()

    thread = threading.Thread(target=work, name=f"attempt-{request.task}", daemon=True)
    thread.start()
    try:
        while not finished.wait(_POLL_S):
            pass
    except KeyboardInterrupt:
        deadline = time.monotonic() + _CANCEL_DEADLINE_S
        while not finished.is_set() and time.monotonic() < deadline:
            _stop_sandboxes(backend, request)  # again, in case it was still being created
            finished.wait(_POLL_S)
        raise
    error = outcome.get("error")
    if isinstance(error, SandfleetError):
        return _error(error, request, node)
    if error is not None:
        raise error
    return _result(outcome["result"], node)


def _scheduler(name: str, actor_id: str) -> Any:
    """The scheduler's handle, looked up by name once per worker process (and again when
    the scheduler was replaced): cheaper than shipping a handle with every attempt."""
    with _backends_lock:
        cached = _schedulers.get(name)
        if cached is None or cached[0] != actor_id:
            from scheduler.ledger_actor import NAMESPACE

            handle = ray.get_actor(name, namespace=NAMESPACE)
            cached = _schedulers[name] = (actor_id, handle)
        return cached[1]


@ray.remote(max_retries=0)
def run_attempt(request: AttemptRequest, scheduler: tuple[str, str] | None = None) -> dict:
    """One attempt, on whatever node Ray placed it. Tells the scheduler (name, actor id)
    when it starts, so `running` is recorded with this node."""
    node = ray.get_runtime_context().get_node_id()
    if scheduler is not None:
        try:
            handle = _scheduler(*scheduler)
        except ValueError:  # the scheduler is gone; its successor will resume the batch
            log.warning("attempt %s/%s: no scheduler %s to notify", request.batch,
                        request.task, scheduler[0])  # fmt: skip
        else:  # fire and forget
            handle.attempt_started.remote(request.batch, request.task, request.attempt, node)
    node_hooks: NodeHooks | None = None
    if request.backend is Backend.DOCKER:
        from scheduler.node_attempt import node_attempt

        def node_hooks() -> contextlib.AbstractContextManager[AttemptHooks | None]:
            return node_attempt(request, task_type=request.task_type)

    return execute(_backend(request.backend), request, node, node_hooks)


def _close_node_attempts(
    batch: str, task: str | None, attempt: int | None
) -> dict[str, dict[str, Any]]:
    """Tell this node's gateway (if it runs) that these attempts are over, so nothing of
    theirs (capture, socket, token) outlives them or holds their workspace. Returns what
    the gateway metered for each of them (`task/attempt` -> its node report)."""
    from scheduler.ledger_actor import NAMESPACE

    node_id = ray.get_runtime_context().get_node_id()
    try:
        gateway = ray.get_actor(f"gateway-{node_id}", namespace=NAMESPACE)
    except ValueError:
        return {}  # no gateway on this node: nothing of theirs to close
    out: Any = ray.get(gateway.close_orphans.remote(batch, task, attempt), timeout=120)
    if out["closed"]:
        log.info("closed orphaned attempts on node %s: %s", node_id[:12], out["closed"])
    return dict(out["metered"])


@ray.remote(num_cpus=0, max_retries=0)
def sweep_sandboxes(
    backend: Backend,
    data_dir: str,
    batch: str,
    task: str | None = None,
    attempt: int | None = None,
) -> dict[str, Any]:
    """Remove the containers and workspaces of an attempt (or of a whole batch) on this node.

    The caller knows none of them is live any more (a cancelled or lost attempt; a batch
    being resumed), so owners are not consulted.
    """
    if backend is Backend.FAKE:
        return {"containers": [], "workspaces": [], "failures": []}
    metered = _close_node_attempts(batch, task, attempt)
    from sandbox.reaper import reap
    from sandbox.workspace import remove_workspace, workspace_root

    docker = _backend(backend)
    if task is None:
        report = reap(docker, data_dir, labels={LABEL_BATCH: batch}, is_live=lambda _: False)
        return {
            "containers": list(report.containers_removed),
            "workspaces": list(report.workspaces_removed),
            "failures": list(report.failures),
        }
    labels: Mapping[str, str] = {LABEL_BATCH: batch, LABEL_TASK: task}
    if attempt is not None:
        labels = {**labels, LABEL_ATTEMPT: str(attempt)}
    removed: list[str] = []
    failures: list[str] = []
    for info in docker.list(labels):
        try:
            docker.remove(info.id)
            removed.append(info.name)
        except SandfleetError as e:
            failures.append(f"container {info.name}: {e}")
    workspaces: list[str] = []
    if attempt is not None:
        root = workspace_root(data_dir, batch, task, attempt)
        if root.exists():
            try:
                remove_workspace(root)
                workspaces.append(str(root))
            except SandfleetError as e:
                failures.append(f"workspace {root}: {e}")
    node_report = metered.get(f"{task}/{attempt}")
    return {
        "containers": removed,
        "workspaces": workspaces,
        "failures": failures,
        # what the node metered for a runner that never returned (a cancel): its tasks row
        "metered": {**_metered(node_report), "node_report": node_report} if node_report else None,
    }


_WARM_PER_NODE: Final = 4  # at most this many workers per node get the runner's imports


@ray.remote(num_cpus=0, max_retries=0)
def warm_node(data_dir: str) -> str:
    """Ready a node for its first attempts while the driver is still starting: this
    worker has the runner's modules imported, and the node's gateway runs."""
    from scheduler.node_attempt import gateway_for_this_node

    gateway_for_this_node(data_dir)
    return str(ray.get_runtime_context().get_node_id())


def warm_nodes(data_dir: str) -> list[Any]:
    """Start `warm_node` on every live node that has sandbox slots (one per slot, at most
    `_WARM_PER_NODE`); returns their refs (the driver waits a few seconds for them
    before it submits: a batch's first attempts then find their workers ready)."""
    refs = []
    for node in ray.nodes():
        slots = int(node.get("Resources", {}).get(SLOT_RESOURCE, 0))
        if node.get("Alive") and slots:
            options = on_node(node["NodeID"])
            refs += [warm_node.options(**options).remote(data_dir)
                     for _ in range(min(slots, _WARM_PER_NODE))]  # fmt: skip
    return refs
