"""The runner's side of the node gateway: `node_attempt(request)`, and finding it.

Inside the `run_attempt` Ray task, `with node_attempt(request) as hooks:` opens the
attempt on this node's `NodeGateway` (compute lease, task token, socket) and yields the
`AttemptHooks` that wire its sandbox to it: the socket directory and the forwarder
mounted read-only, the agent's endpoint environment, the forwarder wrapped around the
command, activity capture from create to exit. An attempt with nothing to forward (no
model, no egress) has an empty channel, so its open is sent without waiting and answers
while the workspace and the container are made; it is awaited (a BudgetError raised)
before the capture starts, so before the sandbox does. The attempt is closed on the gateway
afterwards (lease settled, token revoked, socket removed), whatever happened: sent as
soon as the capture stopped, so it runs while the runner removes the sandbox, and
awaited (its errors raised) when the attempt ends.

`gateway_for_this_node(data_dir)` is the node's `NodeGateway` (created on first use);
`close_node_gateways()` shuts every node's down (the driver, at the end of an embedded
cluster, before it closes the ledger).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from accounting.errors import ConfigError, SandfleetError
from sandbox.activity import CaptureIdentity
from sandbox.attempt import AttemptHooks
from sandbox.credentials import AttemptRef
from sandbox.gateway import AttemptGrant
from scheduler.ledger_actor import NAMESPACE
from scheduler.node_channel import NodeChannel
from scheduler.node_gateway import GatewayClosing, NodeGateway

if TYPE_CHECKING:
    from scheduler.runner import AttemptRequest

__all__ = ["close_node_gateways", "gateway_for_this_node", "get", "node_attempt"]

log = logging.getLogger(__name__)

_DEADLINE_SLACK_S: Final = 300.0  # the workspace clone and the container start come first
_CALL_TIMEOUT_S: Final = 120.0
_REPLACE_S: Final = 30.0  # how long to keep replacing a gateway that is leaving
_handles: dict[str, tuple[str, Any]] = {}  # node id -> (data dir, gateway), per process


def get(ref: Any) -> Any:
    """`ray.get` of an actor call; a sandfleet error raised there comes back as itself."""
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref, timeout=_CALL_TIMEOUT_S)
    except RayTaskError as e:
        if isinstance(e.cause, SandfleetError):
            raise e.cause from None
        raise


def _open(request: AttemptRequest, grant: AttemptGrant, gateway: Any) -> tuple[Any, NodeChannel]:
    """Open the attempt on this node's gateway; one that just left (idle) is replaced."""
    from ray.exceptions import RayActorError

    res = request.template.resources
    deadline = time.monotonic() + _REPLACE_S
    while True:
        gw = gateway if gateway is not None else gateway_for_this_node(request.data_dir)
        try:
            return gw, get(gw.open_attempt.remote(grant, res.cpus, res.memory))
        except (GatewayClosing, RayActorError):
            if gateway is not None or time.monotonic() > deadline:
                raise
            _handles.pop(ray.get_runtime_context().get_node_id(), None)
            time.sleep(0.2)  # the leaving actor's name is freed in a moment


def gateway_for_this_node(data_dir: str, **options: Any) -> Any:
    """This node's gateway actor (created on first use), from inside a Ray task.

    `options` (root, providers_path, lease_s, stop_grace_s) only apply on creation.
    """
    node_id = ray.get_runtime_context().get_node_id()
    cached = _handles.get(node_id)
    if cached is not None and cached[0] == data_dir:
        return cached[1]
    handle = NodeGateway.options(  # type: ignore[attr-defined]
        name=f"gateway-{node_id}",
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(node_id, data_dir, **options)
    actual = get(handle.info.remote())["data_dir"]
    if actual != data_dir:
        raise ConfigError(
            f"the gateway of node {node_id[:12]} writes for data dir {actual}, not {data_dir} "
            "(fix: run every batch of a cluster with the same --data-dir)"
        )
    _handles[node_id] = (data_dir, handle)
    return handle


def close_node_gateways() -> int:
    """Shut down every node's gateway (the driver, before it closes the ledger on an
    embedded cluster): open attempts closed, rows flushed. Returns how many."""
    from ray.util import list_named_actors

    names = [a["name"] for a in list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith("gateway-")]  # fmt: skip
    for name in names:
        handle = ray.get_actor(name, namespace=NAMESPACE)
        get(handle.shutdown.remote())
        ray.kill(handle)
    _handles.clear()
    return len(names)


@contextlib.contextmanager
def node_attempt(
    request: AttemptRequest, *, task_type: str = "", gateway: Any = None
) -> Iterator[AttemptHooks]:
    """Open `request`'s attempt on this node's gateway and yield the hooks that wire its
    sandbox to it (socket, forwarder, env, capture); close it afterwards, whatever happened.

    The model it may call is the task's `SANDFLEET_MODEL`; its egress allowlist is the
    template's. Raises BudgetError when its budget cannot pay for a second of compute.
    """
    model = dict(request.env).get("SANDFLEET_MODEL")
    ref = AttemptRef(request.team, request.batch, request.task, request.attempt)
    grant = AttemptGrant(
        ref, deadline=time.time() + request.timeout_s + _DEADLINE_SLACK_S,
        models=(model,) if model else (), egress=tuple(request.template.network_allowlist),
        task_type=task_type,
    )  # fmt: skip
    opening: list[Any] = []  # an open still in flight
    if grant.models or grant.egress:
        gw, channel = _open(request, grant, gateway)
    else:  # nothing to forward, so the channel is empty: it opens while the sandbox is made
        gw = gateway if gateway is not None else gateway_for_this_node(request.data_dir)
        res = request.template.resources
        opening.append(gw.open_attempt.remote(grant, res.cpus, res.memory))
        channel = NodeChannel(ref, "", {}, {}, ())
    node = ray.get_runtime_context().get_node_id()
    identity = CaptureIdentity(ref.team, ref.batch, ref.task, ref.attempt, node, task_type)
    closing: list[Any] = []  # the close, sent as soon as the capture stopped

    def created(container_id: str, workspace: Path) -> None:
        nonlocal gw
        if opening:  # its answer (a BudgetError raised) comes before the sandbox starts
            from ray.exceptions import RayActorError

            try:
                get(opening.pop())
            except (GatewayClosing, RayActorError):
                if gateway is not None:
                    raise
                _handles.pop(node, None)
                gw, _ = _open(request, grant, None)  # it was leaving (idle): a new one
        get(gw.start_capture.remote(container_id, str(workspace), identity))

    def finished(container_id: str) -> Any:
        report = get(gw.stop_capture.remote(container_id))
        # The sandbox has exited and its capture stopped: the lease settles and the token
        # goes while the runner removes the container and the workspace.
        closing.append(gw.close_attempt.remote(ref))
        return report

    failed = True
    try:
        yield AttemptHooks(
            volumes=channel.volumes,
            env=channel.env,
            wrap_command=channel.wrap,
            on_created=created,
            on_finished=finished,
        )
        failed = False
    finally:
        try:
            if opening:  # the attempt ended before its sandbox was made: let it answer
                with contextlib.suppress(SandfleetError, ray.exceptions.RayError):
                    get(opening.pop())  # (refused, or the gateway is gone: nothing to close)
            get(closing[0] if closing else gw.close_attempt.remote(ref))
        except (SandfleetError, ray.exceptions.RayError) as e:
            if not failed:
                raise
            log.warning("closing attempt %s on the node gateway failed: %s", ref, e)
