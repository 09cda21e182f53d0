"""The driver: validate a batch, connect to (or start) a Ray cluster, run it to the end.

`prepare` does every check that can refuse a batch without starting anything (the spec,
its templates and images, the team's quotas, a batch already in the ledger): a
`ConfigError`, which the CLI turns into exit status 2. `connect` joins the cluster at
`--address`, or starts an embedded local one (`ray.init(address="local", num_cpus=<this
machine's CPUs>, resources={"sandbox_slots": N})`) that it shuts down afterwards.
`run` and `resume` hand the batch to the `FleetScheduler` and follow it to the end,
calling `on_progress` with each status snapshot. Unless `Settings.dashboard` is off,
`connect` also starts (or finds) the cluster's `Monitor` actor — live state, streaming
rules and their actions, `/metrics` and the dashboard — and `on_dashboard` gets its URL
before anything is submitted. `refusal_of_estimate` is the pre-flight cost check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from accounting.errors import ConfigError, SandfleetError, SchedulerError
from accounting.policies import Policies, load_policies
from scheduler.plan import Backend, Plan, plan_batch

__all__ = [
    "BOOTSTRAP_CONFIG",
    "Cluster",
    "Settings",
    "cancel",
    "connect",
    "exit_code",
    "job_request",
    "live_status",
    "prepare",
    "refusal_of_estimate",
    "resume",
    "run",
]

_CANCEL_WAIT_S: Final = 90.0
_WARM_WAIT_S: Final = 5.0  # how long a batch waits for the nodes warming at the start

BOOTSTRAP_CONFIG: Final = Path("~/ray_bootstrap_config.yaml")
"""Where `ray up` leaves the cluster's config on the head (the autoscaler's maximum)."""

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
Announce = Callable[[str], None]
DEFAULT_DASHBOARD_PORT: Final = 8266  # scheduler.dashboard.DEFAULT_PORT


@dataclass(frozen=True)
class Settings:
    """How to run: where the ledger is, which cluster, which backend, which policies."""

    data_dir: str
    address: str | None = None
    backend: Backend = Backend.DOCKER
    policies_path: str | None = None
    slots: int | None = None  # embedded cluster: sandbox slots (default: CPUs)
    max_slots: int | None = None  # autoscaling cap (default: cluster config, else cluster size)
    cluster_config: str | None = None
    poll_s: float = 0.5
    monitor: bool = False  # run the Monitor: live state, streaming rules and their actions
    dashboard: bool = False  # also serve its dashboard and /metrics (--no-dashboard: off)
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = DEFAULT_DASHBOARD_PORT  # 0: any free port


def _policies(settings: Settings) -> Policies:
    return load_policies(settings.policies_path) if settings.policies_path else load_policies()


def prepare(
    batch_path: str | os.PathLike[str], settings: Settings, *, again: str | None = None
) -> Plan:
    """Validate and plan a batch file; refuse (ConfigError) a batch already in the ledger.

    `again` (a run tag) runs the same content as a new batch, `<id>-<tag>`."""
    from scheduler.spec import load_batch

    spec = load_batch(batch_path)
    if again:
        spec = spec.again(again)
    plan = plan_batch(spec, backend=settings.backend, policies=_policies(settings))
    if Path(settings.data_dir, "ledger").exists():
        from scheduler.history import submitted_batches

        if submitted_batches(settings.data_dir, plan.batch_id):
            raise ConfigError(
                f"{batch_path}: batch {plan.batch_id} is already in the ledger under "
                f"{settings.data_dir} (fix: `sandfleet resume {plan.batch_id}` to finish it, "
                "`sandfleet status` to see it, or `sandfleet run --again` to run it anew)"
            )
    return plan


def refusal_of_estimate(plan: Plan, settings: Settings) -> str | None:
    """Why the batch's pre-flight estimate refuses it (over its cap, naming the estimate,
    the cap and `--force`), or None. Uses `scheduler.estimate`; without it, None."""
    try:
        from scheduler.estimate import estimate_batch, exceeds_cap
    except ImportError:
        return None
    from accounting.pricing import load_pricing

    policies = _policies(settings)
    estimate = estimate_batch(plan.spec, load_pricing(), settings.data_dir, policies=policies)
    why: str | None = exceeds_cap(estimate, plan.spec, policies)
    return why or None


def _max_slots(settings: Settings) -> int | None:
    from scheduler.autoscale import cluster_max_slots, load_cluster_config

    if settings.max_slots is not None:
        return settings.max_slots
    path = settings.cluster_config or os.environ.get("SANDFLEET_CLUSTER_CONFIG")
    if path is None and BOOTSTRAP_CONFIG.expanduser().exists():
        path = str(BOOTSTRAP_CONFIG.expanduser())
    return cluster_max_slots(load_cluster_config(path)) if path else None


@dataclass
class Cluster:
    """A connection to a Ray cluster and the sandfleet actors on it."""

    embedded: bool
    ledger: Any
    scheduler: Any
    monitor: Any = None
    dashboard_url: str | None = None


def _launch_monitor(settings: Settings) -> Any:
    """Start the cluster's Monitor (or find it) without waiting for it: it starts while
    the scheduler does and the nodes warm. `_monitor_ready` waits for it."""
    from ray.exceptions import RayError

    from scheduler.monitor_actor import get_monitor

    try:
        return get_monitor(settings.dashboard_host, settings.dashboard_port,
                           _policies(settings), serve=settings.dashboard)  # fmt: skip
    except RayError as e:
        log.warning("the Monitor (dashboard, streaming rules) could not be started: %s; "
                    "running without it (fix: see `ray list actors`)", e)  # fmt: skip
        return None


def _monitor_ready(settings: Settings, monitor: Any) -> tuple[Any, str | None]:
    """The launched Monitor and its dashboard URL, once it answers. A Monitor that cannot
    start (its port taken) is reported, and the batch runs without it."""
    import ray
    from ray.exceptions import RayError

    try:
        url = str(ray.get(monitor.url.remote(), timeout=60))
        return monitor, url or None
    except (RayError, OSError) as e:
        log.warning(
            "the Monitor (dashboard, streaming rules) did not start on %s:%s: %s (fix: "
            "--dashboard-port 0 for any free port, or --no-dashboard); running without it",
            settings.dashboard_host, settings.dashboard_port, e,
        )  # fmt: skip
        return None, None


@contextlib.contextmanager
def connect(settings: Settings) -> Iterator[Cluster]:
    """Join `settings.address` (or an already connected Ray), else start an embedded one;
    start the Monitor when `settings.monitor` (or `settings.dashboard`) asks for it."""
    import ray

    from scheduler.autoscale import SLOT_RESOURCE
    from scheduler.fleet import get_scheduler
    from scheduler.ledger_actor import NAMESPACE, get_ledger
    from scheduler.runner import warm_nodes

    started = embedded = False
    if not ray.is_initialized():
        if settings.address:
            ray.init(address=settings.address, namespace=NAMESPACE, log_to_driver=False)
        else:
            cpus = os.cpu_count() or 1
            ray.init(
                address="local",
                num_cpus=cpus,
                resources={SLOT_RESOURCE: settings.slots or cpus},
                namespace=NAMESPACE,
                include_dashboard=False,
                log_to_driver=False,
            )
            embedded = True
        started = True
    cluster: Cluster | None = None
    try:
        ledger = get_ledger(settings.data_dir)
        warming = warm_nodes(settings.data_dir) if settings.backend is Backend.DOCKER else []
        monitor = _launch_monitor(settings) if settings.monitor or settings.dashboard else None
        scheduler = get_scheduler(
            settings.data_dir, policies=_policies(settings), max_slots=_max_slots(settings)
        )
        if warming:  # the batch is submitted to nodes ready to run it, not still starting
            _, late = ray.wait(warming, num_returns=len(warming), timeout=_WARM_WAIT_S)
            if late:
                log.warning("%d of %d workers still warming after %.0fs; submitting anyway",
                         len(late), len(warming), _WARM_WAIT_S)  # fmt: skip
        cluster = Cluster(embedded, ledger, scheduler)
        if monitor is not None:
            cluster.monitor, cluster.dashboard_url = _monitor_ready(settings, monitor)
        yield cluster
    except BaseException:
        if cluster is not None:
            try:
                _close(cluster)
            except Exception:  # the error in flight matters more; this one is logged
                log.exception("closing the sandfleet actors after an error failed")
        raise
    else:
        if cluster is not None:
            _close(cluster)
    finally:
        if started:
            ray.shutdown()


def _close_keeper() -> None:
    """Flush the budget keeper's events to the ledger (embedded cluster, before it goes)."""
    import ray
    from ray.exceptions import RayError

    from scheduler.fleet import BUDGET_NAME
    from scheduler.ledger_actor import NAMESPACE

    try:
        keeper = ray.get_actor(BUDGET_NAME, namespace=NAMESPACE)
    except ValueError:
        return
    try:
        ray.get(keeper.close.remote(), timeout=60)
    except (RayError, AttributeError) as e:  # gone, or a keeper without close()
        log.warning("closing the budget keeper failed: %s", e)


def _close(cluster: Cluster) -> None:
    """Flush the ledger; on an embedded cluster also stop the scheduler and close the ledger."""
    import ray
    from ray.exceptions import RayActorError

    if cluster.embedded:
        try:
            ray.get(cluster.scheduler.close.remote())
        except RayActorError:  # a dead scheduler has nothing left to stop
            log.warning("the scheduler was already gone when the driver stopped it")
        try:  # open attempts closed and their rows flushed before the ledger closes
            from scheduler.node_attempt import close_node_gateways
        except ImportError:
            pass
        else:
            close_node_gateways()
        _close_keeper()
        if cluster.monitor is not None:
            try:  # its last findings reach the ledger before the ledger closes
                ray.get(cluster.monitor.close.remote(), timeout=60)
            except RayActorError:
                log.warning("the Monitor was already gone when the driver stopped it")
        ray.get(cluster.ledger.close.remote())
    else:
        ray.get(cluster.ledger.flush.remote())


def _follow(cluster: Cluster, batch_id: str, settings: Settings, on_progress: Progress) -> dict:
    """Follow the batch to the end. Interrupted (Ctrl-C) on an embedded cluster, cancel it
    first, so its sandboxes are removed before the cluster goes; on a shared cluster the
    batch goes on (`sandfleet status`, `sandfleet cancel`)."""
    try:
        return _poll(cluster, batch_id, settings, on_progress)
    except KeyboardInterrupt:
        if cluster.embedded:
            log.warning("interrupted: cancelling batch %s before stopping", batch_id)
            _get(cluster.scheduler.cancel.remote(batch_id))
            _get(cluster.scheduler.wait.remote(batch_id, _CANCEL_WAIT_S))
        else:
            log.warning("interrupted: batch %s goes on in the cluster (sandfleet status %s)",
                        batch_id, batch_id)  # fmt: skip
        raise


def _poll(cluster: Cluster, batch_id: str, settings: Settings, on_progress: Progress) -> dict:
    from ray.exceptions import RayActorError

    while True:
        try:
            status = _get(cluster.scheduler.wait.remote(batch_id, settings.poll_s))
        except RayActorError as e:
            raise SchedulerError(
                f"the scheduler died while running batch {batch_id} ({e}) (fix: `sandfleet "
                f"resume {batch_id}` finishes it from the ledger)"
            ) from None
        batch = status["batches"].get(batch_id)
        if batch is None:  # the actor was restarted and lost its memory: rebuild from the ledger
            status = _get(cluster.scheduler.resume.remote(batch_id, None))
            batch = status["batches"][batch_id]
        on_progress(status)
        if status.get("fault"):
            raise SchedulerError(f"the scheduler stopped: {status['fault']}")
        if batch["done"]:
            return batch


def run(
    plan: Plan, settings: Settings, on_progress: Progress = lambda _: None,
    on_dashboard: Announce = lambda _: None,
) -> dict:  # fmt: skip
    """Run a prepared batch to the end; returns its final status (states per count)."""

    with connect(settings) as cluster:
        if cluster.dashboard_url:
            on_dashboard(cluster.dashboard_url)
        on_progress(_get(cluster.scheduler.submit.remote(plan)))
        return _follow(cluster, plan.batch_id, settings, on_progress)


def resume(
    batch_id: str, settings: Settings, *, backend: str | None = None,
    on_progress: Progress = lambda _: None, on_dashboard: Announce = lambda _: None,
) -> dict:  # fmt: skip
    """Finish a batch from the ledger (after the driver or the scheduler was lost)."""

    with connect(settings) as cluster:
        if cluster.dashboard_url:
            on_dashboard(cluster.dashboard_url)
        on_progress(_get(cluster.scheduler.resume.remote(batch_id, backend)))
        return _follow(cluster, batch_id, settings, on_progress)


def _get(ref: Any) -> Any:
    """`ray.get` of an actor call; a sandfleet error raised in the actor comes back as itself."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as e:
        if isinstance(e.cause, SandfleetError):
            raise e.cause from None
        raise


@contextlib.contextmanager
def _existing_scheduler(settings: Settings) -> Iterator[Any]:
    """The running scheduler of the cluster at `--address` ($RAY_ADDRESS, else `auto`)."""
    import ray

    from scheduler.fleet import SCHEDULER_NAME
    from scheduler.ledger_actor import NAMESPACE

    address = settings.address or os.environ.get("RAY_ADDRESS") or "auto"
    started = False
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
        except ConnectionError as e:
            raise SchedulerError(
                f"no Ray cluster answers at {address} ({e}) (fix: pass --address of the "
                "cluster that runs the batch)"
            ) from None
        started = True
    try:
        try:
            handle = ray.get_actor(SCHEDULER_NAME, namespace=NAMESPACE)
        except ValueError:
            raise SchedulerError(
                f"no sandfleet scheduler runs on the cluster at {address} (fix: start the "
                "batch with `sandfleet run`, or `sandfleet resume BATCH` if it was lost)"
            ) from None
        yield handle
    finally:
        if started:
            ray.shutdown()


def cancel(target: str, settings: Settings) -> dict[str, Any]:
    """Cancel a batch or a task in the cluster's running scheduler."""

    with _existing_scheduler(settings) as scheduler:
        return dict(_get(scheduler.cancel.remote(target)))


def live_status(settings: Settings, batch_id: str | None = None) -> dict[str, Any]:
    """The running scheduler's status (batches it holds, teams, cluster)."""

    with _existing_scheduler(settings) as scheduler:
        return dict(_get(scheduler.status.remote(batch_id)))


def exit_code(batch: dict[str, Any]) -> int:
    """0 when every task succeeded, else 1."""
    return 0 if batch["states"].get("succeeded", 0) == batch["total"] else 1


def job_request(
    batch_path: str | os.PathLike[str], *, batch_id: str, data_dir: str, backend: Backend,
    nonce: str,
) -> dict[str, Any]:  # fmt: skip
    """The `JobSubmissionClient.submit_job` arguments that run `sandfleet run` on the head.

    The batch file's folder is uploaded as the job's working directory (so `tasks_from:`
    tables next to it travel along); the driver joins the cluster with `--address auto`.
    `data_dir` is a path on the cluster (or a URI): a relative one would land in the
    job's temporary working directory, so it is refused.
    """
    if "://" not in data_dir and not (data_dir.startswith(("/", "~"))):
        raise ConfigError(
            f"--data-dir {data_dir!r}: a job needs a path on the cluster that outlives it "
            "(fix: give an absolute path such as ~/sandfleet-data, or an s3:// URI)"
        )
    path = Path(batch_path).resolve()
    argv = ["sandfleet", "run", path.name, "--data-dir", data_dir, "--address", "auto",
            "--backend", backend.value, "--json"]  # fmt: skip
    return {
        "entrypoint": shlex.join(argv),
        "runtime_env": {"working_dir": str(path.parent)},
        "submission_id": f"sandfleet-{batch_id}-{nonce}",
        "metadata": {"sandfleet.batch": batch_id, "sandfleet.backend": backend.value},
    }
