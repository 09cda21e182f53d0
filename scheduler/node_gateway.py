"""`NodeGateway`: one per node — the gateway, the process-events hub, the captures.

Named `gateway-<node_id>` in namespace `sandfleet`, `num_cpus=0`, detached, pinned to
its node (`NodeAffinitySchedulingStrategy(soft=False)`); `scheduler.node_attempt`'s
`gateway_for_this_node()` returns it (created on first use) from inside the runner's
Ray task. A threaded actor: small methods, picklable arguments and results. It holds:

- one `GatewayThread` (the task tokens' keys live only in its memory; providers from
  `configs/providers.yaml`; budget through the `budget` actor, failing closed; every
  event and charge to the `ledger` actor when one exists — it does whenever the driver
  runs — else to a `LedgerWriter` of its own on the data dir);
- one `NetlinkProcHub` for the node, shared by the attempts' `ActivityCapture`s;
- per attempt: a renewable compute lease (template cpus and memory x the compute
  prices, `lease_s` at a time) and a tally of its charges (compute, LLM, network) and
  tokens, read from the very rows that go to the ledger.

When a cap refuses an LLM call (HTTP 402) or a lease renewal, the attempt is marked
`budget_exceeded` and its container stopped; `stop_capture` reports it as the
attempt's `stop_reason`. Sockets live under `/run/sandfleet/gw-<node>/` on the host
(short: a unix socket path must stay under ~100 bytes).

The runner's side is `scheduler.node_attempt` (`node_attempt(request)`); the channel an
attempt gets and its tally are in `scheduler.node_channel`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import ray

import sandbox.forwarder
from accounting.errors import BudgetError, SandboxError, SandfleetError
from accounting.pricing import load_pricing
from sandbox.activity import ActivityCapture, CaptureIdentity, CaptureReport, ledger_sink
from sandbox.attempt import AttemptOutcome
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.gateway import MOUNT_POINT, SOCKET_NAME, AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread
from sandbox.proc_hub import NetlinkProcHub
from sandbox.providers import load_providers, load_providers_config
from scheduler.budget import CapReached, compute_rate_nusd_per_s
from scheduler.budget_keeper import budget_client, keeper_lookup, unwrap
from scheduler.compute_lease import ComputeLeases
from scheduler.fleet_outbox import LedgerSender
from scheduler.ledger_actor import LEDGER_NAME, NAMESPACE
from scheduler.node_channel import NodeChannel, Tally

__all__ = ["FORWARDER_MOUNT", "NodeChannel", "NodeGateway", "default_root"]

log = logging.getLogger(__name__)

FORWARDER_MOUNT: Final = "/opt/sandfleet/forwarder.py"
_FORWARDER: Final = Path(sandbox.forwarder.__file__).resolve()
_CALL_TIMEOUT_S: Final = 120.0
_CLOSED_KEPT: Final = 4096  # closed attempts whose metering is kept for the sweep


@dataclass
class _Live:
    grant: AttemptGrant
    tally: Tally = field(default_factory=Tally)
    container: str | None = None
    capture: ActivityCapture | None = None
    report: CaptureReport | None = None
    stop_reason: str | None = None
    why: str = ""


def _forwards(grant: AttemptGrant) -> bool:
    """Whether the attempt gets a gateway channel: a model to call or a host to reach."""
    return bool(grant.models or grant.egress)


def default_root(node_id: str) -> Path:
    return Path("/run/sandfleet") / f"gw-{node_id[:12]}"


class GatewayClosing(SandboxError):
    """This node's gateway is leaving (idle); the caller starts a new one and retries."""


# A threaded actor: the runner's calls, the gateway's loop and the lease thread share it.
@ray.remote(num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=0)  # type: ignore[call-overload]
class NodeGateway:
    """See the module doc."""

    def __init__(
        self,
        node_id: str,
        data_dir: str,
        root: str | None = None,
        providers_path: str | None = None,
        lease_s: int = 60,
        stop_grace_s: float = 2.0,
        idle_exit_s: float = 10.0,
    ) -> None:
        if os.geteuid() != 0:
            raise SandboxError(
                "the node gateway must run as root: it gives each socket to the sandbox's "
                "uid and reads process events (fix: run the Ray worker nodes as root)"
            )
        from sandbox.docker_backend import DockerBackend

        self.node_id, self.data_dir = node_id, data_dir
        self.stop_grace_s = stop_grace_s
        self._root = Path(root) if root else default_root(node_id)
        self._prices = load_pricing()
        config = load_providers_config(providers_path)
        self._lock = threading.Lock()
        self._live: dict[AttemptRef, _Live] = {}
        # What closed attempts metered, kept a while: a cancelled runner never returns its
        # report, so the scheduler's sweep asks here for the attempt's tasks row.
        self._closed: OrderedDict[AttemptRef, _Live] = OrderedDict()
        self._by_container: dict[str, AttemptRef] = {}
        self._writer: Any = None
        self._sender: LedgerSender | None = None
        self._downstream = self._ledger()  # `append` tallies each row, then sends it here
        self._keeper = keeper_lookup()
        self._docker = DockerBackend()
        self._hub = NetlinkProcHub()
        # mypy: gateway.Reserved declares settable attributes; a frozen Reservation has
        # read-only ones (the same for every BudgetClient; the gateway only reads them)
        budget: Any = budget_client(self._keeper)
        self._thread = GatewayThread(
            lambda: Gateway(
                self._root, credentials=TaskCredentials(), providers=load_providers(config),
                budget=budget, sink=self, prices=self._prices, node=node_id,
                default_max_tokens=config.default_max_tokens, on_budget_refused=self._refused,
            )
        ).start()  # fmt: skip
        self._leases = ComputeLeases(self._call, lease_s, self._exceeded).start()
        # An actor keeps its node busy, so the autoscaler would never retire an idle
        # worker: leave once no attempt has been live for `idle_exit_s` (0: never).
        self._idle_exit_s = idle_exit_s
        self._last_busy = time.monotonic()
        self._closing = False
        if idle_exit_s > 0:
            threading.Thread(target=self._exit_when_idle, name="gateway-idle", daemon=True).start()

    def _exit_when_idle(self) -> None:
        while True:
            time.sleep(1.0)
            with self._lock:
                if self._live:
                    self._last_busy = time.monotonic()
                    continue
                if time.monotonic() - self._last_busy < self._idle_exit_s:
                    continue
                self._closing = True
            break
        log.info("node gateway %s idle for %.0fs: leaving", self.node_id[:12], self._idle_exit_s)
        try:
            self.shutdown()
        finally:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _ledger(self) -> Any:
        try:
            # queued and sent every 100 ms: a capture's sink (the node's capture loop) and
            # an attempt's end (its last rows) never wait on the ledger actor
            self._sender = LedgerSender(ray.get_actor(LEDGER_NAME, namespace=NAMESPACE))
            return self._sender
        except ValueError:  # no ledger actor: this node writes its own segments
            from accounting.writer import LedgerWriter

            self._writer = LedgerWriter(self.data_dir, node=self.node_id)
            return self._writer

    def info(self) -> dict[str, Any]:
        """Where it writes, and each open attempt's tally so far (keyed `str(ref)`)."""
        with self._lock:
            attempts = {str(ref): vars(live.tally).copy() for ref, live in self._live.items()}
        ledger = "writer" if self._writer is not None else "actor"
        return {"node": self.node_id, "data_dir": self.data_dir, "root": str(self._root),
                "attempts": attempts, "ledger": ledger}  # fmt: skip

    # -- the LedgerSink every gateway and capture row goes through -------------------------

    def append(self, table: str, rows: Sequence[Any] | pa.Table) -> Any:
        """Send rows (records, or an Arrow table: a capture's command events) on, and
        tally them to their attempts."""
        if isinstance(rows, pa.Table):
            result = self._downstream.append(table, rows)
            parts = Tally.by_attempt(Tally.counted(table, rows))  # (commands: none)
            with self._lock:
                for ref, part in parts:
                    live = self._live.get(ref) or self._closed.get(ref)
                    if live is not None:
                        live.tally.add_table(table, part)
            return result
        rows = list(rows)
        result = self._downstream.append(table, rows)
        with self._lock:
            for row in rows:
                ref = AttemptRef(row.team, row.batch, row.task, row.attempt)
                live = self._live.get(ref) or self._closed.get(ref)  # a late call's charge
                if live is not None:
                    live.tally.add(table, row)
        return result

    # -- attempts ----------------------------------------------------------------------------

    def open_attempt(self, grant: AttemptGrant, cpus: float, memory_bytes: int) -> NodeChannel:
        """Lease the first stretch of compute, open the gateway socket; raises BudgetError
        when the task's, batch's or team's budget cannot pay for a second of compute."""
        with self._lock:
            if self._closing:
                raise GatewayClosing(
                    f"the gateway of node {self.node_id[:12]} is leaving (idle); "
                    "fix: retry, a new one starts"
                )
            self._last_busy = time.monotonic()
        self._leases.open(grant.ref, compute_rate_nusd_per_s(self._prices, cpus, memory_bytes))
        if not _forwards(grant):
            # No model and no host to reach: nothing to forward, so no socket, no token
            # and no forwarder in the container (one Python start less per attempt).
            with self._lock:
                self._live[grant.ref] = _Live(grant)
            return NodeChannel(grant.ref, "", {}, {}, ())
        try:
            channel = self._thread.open_attempt(grant)
        except BaseException:
            for problem in self._leases.settle(grant.ref):  # the first error matters
                log.warning("%s", problem)
            raise
        with self._lock:
            self._live[grant.ref] = _Live(grant)
        env = {k: v for k, v in channel.env().items() if k != "OPENAI_API_KEY"}
        volumes = {**channel.volumes(), str(_FORWARDER): {"bind": FORWARDER_MOUNT, "mode": "ro"}}
        prefix = ("python3", FORWARDER_MOUNT, "--socket", f"{MOUNT_POINT}/{SOCKET_NAME}", "--")
        return NodeChannel(grant.ref, str(channel.directory), volumes, env, prefix)

    def start_capture(
        self, container_id: str, workspace_path: str, identity: CaptureIdentity
    ) -> str:
        """Capture the container's activity (call before it starts); returns the mode.
        Raises BudgetError when the attempt was stopped meanwhile (it must not start)."""
        ref = AttemptRef(identity.team, identity.batch, identity.task, identity.attempt)
        with self._lock:
            live = self._live.get(ref)
        if live is None:
            raise SandboxError(f"attempt {ref} is not open on this node (call open_attempt first)")
        capture = ActivityCapture(container_id, workspace_path, identity, ledger_sink(self),
                                  prices=self._prices, hub=self._hub)  # fmt: skip
        capture.start()
        with self._lock:
            live.container, live.capture = container_id, capture
            self._by_container[container_id] = ref
            why = live.why if live.stop_reason is not None else ""
        if why:
            self._end_capture(live)
            raise BudgetError(why)
        return str(capture.mode.value if capture.mode else "")

    def stop_capture(self, container_id: str) -> dict[str, Any]:
        """Stop the container's capture (after it exited, before removal); the attempt's
        measured totals, charges so far, and `stop_reason` when the node stopped it."""
        with self._lock:
            ref = self._by_container.get(container_id)
            live = self._live.get(ref) if ref is not None else None
        if live is None:
            raise SandboxError(f"no capture of sandbox {container_id[:12]} on this node")
        errors = self._end_capture(live)
        if _forwards(live.grant):  # (without a channel the gateway has no rows of it)
            try:
                self._thread.flush()  # every gateway row of the attempt reached the tally
            except SandfleetError as e:
                errors.append(f"gateway ledger flush: {e}")
        return self._report(live, errors)

    def _end_capture(self, live: _Live) -> list[str]:
        with self._lock:
            capture, live.capture = live.capture, None
        if capture is None:
            return []
        try:
            capture.stop()
        except SandboxError as e:  # what it measured is still in capture.report
            return [str(e)]
        finally:
            live.report = capture.report
        return []

    def _report(self, live: _Live, errors: list[str]) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {**vars(live.tally), "stop_reason": live.stop_reason,
                                   "stop_detail": live.why or None}  # fmt: skip
        capture = live.report
        out["capture_error"] = "; ".join(errors) or None
        if capture is not None:
            t = capture.totals
            out |= {"capture_mode": capture.mode.value, "commands": capture.commands,
                    "file_changes": capture.file_changes, "samples": capture.samples,
                    "cpu_core_seconds": float(t.cpu_core_seconds),
                    "memory_gib_seconds": float(t.memory_gib_seconds),
                    "memory_peak_bytes": t.memory_peak_bytes,
                    "lost_commands": capture.lost_commands}  # fmt: skip
        return out

    def close_orphans(
        self, batch: str, task: str | None = None, attempt: int | None = None
    ) -> dict[str, Any]:
        """Close every live attempt of `batch` (or of one task / attempt) whose runner is
        gone (a killed scheduler, a cancel): its capture stops watching the workspace, its
        lease settles, its token dies. The sweep calls this before removing workspaces.
        Returns the attempts closed now, and what each matching attempt metered (closed now
        or earlier by its runner), keyed `task/attempt`: the tasks row of an attempt whose
        runner was cancelled is built from it."""

        def matches(ref: AttemptRef) -> bool:
            return (
                ref.batch == batch
                and (task is None or ref.task == task)
                and (attempt is None or ref.attempt == attempt)
            )

        with self._lock:
            refs = [ref for ref in self._live if matches(ref)]
        for ref in refs:
            self.close_attempt(ref)
        with self._lock:
            done = [(r, live) for r, live in self._closed.items() if matches(r)]
        metered = {f"{r.task}/{r.attempt}": self._report(live, []) for r, live in done}
        return {"closed": [str(ref) for ref in refs], "metered": metered}

    def close_attempt(self, ref: AttemptRef) -> dict[str, Any]:
        """End the attempt here: any capture left running, its lease settled for the time
        used, its token revoked and its socket removed. Idempotent."""
        with self._lock:
            live = self._live.get(ref)
        errors: list[str] = []
        cut_short = live is not None and live.capture is not None  # its runner never stopped it
        if live is not None:
            errors += self._end_capture(live)
        errors += self._leases.settle(ref)
        forwards = live is None or _forwards(live.grant)  # (unknown: close it to be sure)
        if forwards:
            self._thread.close_attempt(ref)
        if cut_short and forwards:
            try:
                self._thread.flush()  # the attempt's last gateway rows reach its tally
            except SandfleetError as e:
                errors.append(f"gateway ledger flush: {e}")
        with self._lock:
            self._live.pop(ref, None)
            if live is not None and live.container is not None:
                self._by_container.pop(live.container, None)
            if live is not None:
                self._closed[ref] = live
                while len(self._closed) > _CLOSED_KEPT:
                    self._closed.popitem(last=False)
        return {"stop_reason": live.stop_reason if live else None, "errors": errors}

    def flush(self) -> None:
        """Every row so far reached the ledger (tests, shutdown)."""
        self._thread.flush()
        if self._sender is not None:
            self._sender.flush()
        if self._writer is not None:
            self._writer.flush()

    def shutdown(self) -> None:
        """Close every attempt and the gateway; close this node's own writer, if any."""
        self._leases.stop()
        for ref in list(self._live):
            self.close_attempt(ref)
        self._thread.stop()
        if self._sender is not None:
            self._sender.close()
        if self._writer is not None:
            self._writer.close()
        try:
            self._root.rmdir()  # every attempt's socket directory is gone: leave no trace
        except OSError as e:
            log.debug("keeping %s: %s", self._root, e)

    # -- budget ------------------------------------------------------------------------------

    def _call(self, method: Any) -> Any:
        """A keeper call, its refusal raised as a plain BudgetError (which pickles)."""
        try:
            return unwrap(ray.get(method(self._keeper()), timeout=_CALL_TIMEOUT_S))
        except CapReached as e:
            raise BudgetError(str(e)) from None

    def _refused(self, ref: AttemptRef, error: BudgetError) -> None:
        """The gateway's `on_budget_refused`: a cap (not an outage) ends the attempt."""
        if isinstance(error, CapReached):
            self._exceeded(ref, str(error))

    def _exceeded(self, ref: AttemptRef, why: str) -> None:
        with self._lock:
            live = self._live.get(ref)
            if live is None or live.stop_reason is not None:
                return
            live.stop_reason, live.why = AttemptOutcome.BUDGET_EXCEEDED.value, why
            container = live.container
        log.warning("attempt %s stops: %s", ref, why)
        if container is not None:  # off the caller's thread: the 402 goes out meanwhile
            threading.Thread(target=self._stop_container, args=(container,), daemon=True).start()

    def _stop_container(self, container_id: str) -> None:
        try:
            self._docker.stop(container_id, grace_s=self.stop_grace_s)
        except SandboxError as e:  # gone meanwhile: nothing left to stop
            log.info("stop of sandbox %s: %s", container_id[:12], e)
