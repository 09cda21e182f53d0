"""Helpers for tests and benchmarks of the Ray side: a private local Ray, fleet teardown,
small batches, and the ledger facts a test proves things from.

`local_ray` starts a local Ray with a fixed number of CPUs and sandbox slots in a
private temp dir (so no other Ray on the machine sees or joins it) and always shuts it
down, killing any process of its own left behind. `stop_fleet` removes the scheduler
and ledger actors (after a final flush), so the next test can start its own.
`state_rows` / `terminal_counts` / `last_states` read a batch's `task_state` events
back from the Parquet ledger (DuckDB), never from the scheduler's counters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from scheduler.plan import Backend, Plan

__all__ = [
    "containers_of",
    "flush_ledger",
    "kill_leftovers",
    "last_states",
    "local_ray",
    "make_plan",
    "remove_containers",
    "source_dir",
    "state_rows",
    "stop_fleet",
    "terminal_counts",
    "wait_actor_gone",
]


def kill_leftovers(marker: str) -> None:
    """Kill processes whose command line holds `marker` (a private temp dir), except us."""
    import importlib

    import ray  # noqa: F401 - importing Ray puts its vendored psutil on sys.path

    psutil = importlib.import_module("psutil")

    me = os.getpid()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.info["pid"] != me and marker in cmdline:
            with contextlib.suppress(psutil.NoSuchProcess):  # exited on its own meanwhile
                proc.kill()


@contextlib.contextmanager
def local_ray(
    *, num_cpus: int, slots: int, resources: Mapping[str, float] | None = None
) -> Iterator[str]:
    """A private local Ray: `num_cpus` CPUs, `slots` sandbox slots. Yields its temp dir."""
    import ray

    from scheduler.autoscale import SLOT_RESOURCE
    from scheduler.ledger_actor import NAMESPACE

    tmp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")  # short: unix socket paths
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_USAGE_STATS_ENABLED", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.pop("RAY_ADDRESS", None)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            resources={SLOT_RESOURCE: slots, **(resources or {})},
            namespace=NAMESPACE,
            include_dashboard=False,
            log_to_driver=False,
        )
        yield tmp
    finally:
        ray.shutdown()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_actor_gone(name: str, timeout_s: float = 30.0) -> None:
    """Poll until no actor is registered under `name` (names free up asynchronously)."""
    import ray

    from scheduler.ledger_actor import NAMESPACE

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"actor {name!r} still registered after {timeout_s:.0f}s")
        time.sleep(0.1)


def flush_ledger() -> int:
    """Make every row the ledger actor holds durable (before reading the Parquet back)."""
    import ray

    from scheduler.ledger_actor import LEDGER_NAME, NAMESPACE

    rows: Any = ray.get(ray.get_actor(LEDGER_NAME, namespace=NAMESPACE).flush.remote())
    return int(rows)


def stop_fleet() -> dict[str, Any]:
    """Close and kill sandfleet's actors (scheduler, node gateways, budget keeper, monitor,
    ledger; those that exist), in an order that loses no row; report what was done."""
    import ray
    from ray.exceptions import RayActorError

    from scheduler.budget_keeper import KEEPER_NAME
    from scheduler.fleet import SCHEDULER_NAME
    from scheduler.ledger_actor import LEDGER_NAME, NAMESPACE
    from scheduler.monitor_actor import MONITOR_NAME
    from scheduler.node_attempt import close_node_gateways

    done: dict[str, Any] = {}
    order = (SCHEDULER_NAME, None, KEEPER_NAME, MONITOR_NAME, LEDGER_NAME)  # None: gateways
    for name, closing in ((n, "close") for n in order):
        if name is None:  # the nodes' gateways flush into the ledger: before it closes
            done["gateways"] = close_node_gateways()
            continue
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(getattr(handle, closing).remote(), timeout=60)
            done[name] = "closed"
        except AttributeError:  # a test's stand-in without `close`: just kill it
            done[name] = "killed"
        except RayActorError as e:  # already dead: nothing to close
            done[name] = f"dead: {type(e).__name__}"
        ray.kill(handle, no_restart=True)
        wait_actor_gone(name)
    return done


def source_dir(directory: Path) -> Path:
    """A small folder (not a repository): every task's workspace is copied from it."""
    src = directory / "src"
    src.mkdir(exist_ok=True)
    (src / "README").write_text("sandfleet test workspace\n")
    return src


def make_plan(
    directory: Path,
    name: str,
    team: str,
    commands: Sequence[str],
    *,
    backend: Backend,
    policies_path: Path | None = None,
    max_attempts: int = 2,
    timeout: int = 120,
    priority: int = 0,
) -> Plan:
    """A planned batch of shell commands (ids t0000, t0001, ...) in the minimal template."""
    from accounting.policies import load_policies
    from scheduler.plan import plan_batch
    from scheduler.spec import parse_batch

    src = source_dir(directory)
    data = {
        "name": name,
        "team": team,
        "priority": priority,
        "defaults": {"template": "minimal", "max_attempts": max_attempts, "timeout": timeout},
        "tasks": [
            {"id": f"t{i:04d}", "repo": str(src), "command": c} for i, c in enumerate(commands)
        ],
    }
    spec = parse_batch(data, source=directory / f"{name}.yaml")
    policies = load_policies(policies_path) if policies_path else load_policies()
    return plan_batch(spec, backend=backend, policies=policies)


def state_rows(data_dir: str | Path, batch: str) -> list[dict[str, Any]]:
    """The batch's `task_state` events from the ledger, each with `state` and `reason`."""
    from scheduler.history import batch_events

    rows = []
    for event in batch_events(data_dir, batch):
        if event["kind"] != "task_state":
            continue
        row = dict(event)
        payload = json.loads(row["payload"])
        row["state"] = payload["state"]
        row["reason"] = payload.get("reason", "")
        rows.append(row)
    return rows


def terminal_counts(rows: Sequence[Mapping[str, Any]]) -> Counter[str]:
    """Per task, how many terminal states the rows hold (exactly one each when finished)."""
    from scheduler.state import TERMINAL_STATES

    terminal = {s.value for s in TERMINAL_STATES}
    return Counter(str(r["task"]) for r in rows if r["state"] in terminal)


def last_states(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Per task, its last state in ledger order."""
    ordered = sorted(rows, key=lambda r: (r["time"], r["chain_id"], r["event_seq"]))
    return {str(r["task"]): str(r["state"]) for r in ordered}


def containers_of(docker_client: Any, batch: str) -> list[str]:
    """Names of the containers (any state) labelled with `batch`."""
    found = docker_client.containers.list(all=True, filters={"label": f"sandfleet.batch={batch}"})
    return [c.name for c in found]


def remove_containers(docker_client: Any, batch: str) -> list[str]:
    """Remove (and name) the containers labelled with `batch` that a test left behind."""
    left = docker_client.containers.list(all=True, filters={"label": f"sandfleet.batch={batch}"})
    for c in left:
        c.remove(force=True)
    return [c.name for c in left]
