"""The driver: validate a batch, connect to (or start) a Ray cluster, run it to the end.

`prepare` does every check that can refuse a batch without starting anything (the spec,
its templates and images, the team's quotas, a batch already in the ledger): a
`ConfigError`, which the CLI turns into exit status 2. `run` and `resume` connect to the
cluster (`scheduler.cluster.connect`: joined at `--address`, or an embedded one), hand
the batch to the `FleetScheduler` and follow it to the end, calling `on_progress` with
each status snapshot; `on_dashboard` gets the Monitor's dashboard URL before anything is
submitted. `refusal_of_estimate` is the pre-flight cost check.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from accounting.errors import ConfigError, SandfleetError, SchedulerError
from scheduler.cluster import BOOTSTRAP_CONFIG, Cluster, Settings, connect, policies_of
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
log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
Announce = Callable[[str], None]


def prepare(
    batch_path: str | os.PathLike[str], settings: Settings, *, again: str | None = None
) -> Plan:
    """Validate and plan a batch file; refuse (ConfigError) a batch already in the ledger.

    `again` (a run tag) runs the same content as a new batch, `<id>-<tag>`."""
    from scheduler.spec import load_batch

    spec = load_batch(batch_path)
    if again:
        spec = spec.again(again)
    plan = plan_batch(spec, backend=settings.backend, policies=policies_of(settings))
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

    policies = policies_of(settings)
    estimate = estimate_batch(plan.spec, load_pricing(), settings.data_dir, policies=policies)
    why: str | None = exceeds_cap(estimate, plan.spec, policies)
    return why or None


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
