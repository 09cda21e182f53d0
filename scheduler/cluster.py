"""The cluster a batch runs on: `connect(settings)` joins the Ray cluster at
`--address`, or starts an embedded local one (`ray.init(address="local", num_cpus=<this
machine's CPUs>, resources={"sandbox_slots": N})`) that it shuts down afterwards, and
yields the sandfleet actors on it (`Cluster`): the ledger, the scheduler (with the budget
keeper), and, unless `Settings.dashboard` is off, the `Monitor` — live state, streaming
rules and their actions, `/metrics` and the dashboard. The Monitor starts while the
scheduler does and the nodes warm (the runner's imports, the node gateway), and a batch
is submitted once they are warm (`_WARM_WAIT_S` at most). Leaving, it flushes the
ledger; on an embedded cluster it also stops the scheduler, the node gateways, the
keeper and the Monitor, then closes the ledger.

`Settings` is how to run (ledger, cluster, backend, policies, dashboard);
`scheduler.driver` runs batches with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from accounting.policies import Policies, load_policies
from scheduler.plan import Backend

__all__ = ["BOOTSTRAP_CONFIG", "Cluster", "Settings", "connect", "policies_of"]

_WARM_WAIT_S: Final = 5.0  # how long a batch waits for the nodes warming at the start

BOOTSTRAP_CONFIG: Final = Path("~/ray_bootstrap_config.yaml")
"""Where `ray up` leaves the cluster's config on the head (the autoscaler's maximum)."""

log = logging.getLogger(__name__)

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


def policies_of(settings: Settings) -> Policies:
    """The policies `settings` name (configs/policies.yaml by default)."""
    return load_policies(settings.policies_path) if settings.policies_path else load_policies()


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
                           policies_of(settings), serve=settings.dashboard)  # fmt: skip
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
            settings.data_dir, policies=policies_of(settings), max_slots=_max_slots(settings)
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
