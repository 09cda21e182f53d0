"""Compute leases of the attempts on one node: reserved ahead, renewed, settled for the time used.

An attempt's sandbox costs its limits x wall time (`compute_rate_nusd_per_s`). Before it
starts, `open(ref, rate)` leases `lease_s` seconds from the BudgetKeeper (fewer when
the budget can pay fewer; `BudgetError` when it cannot pay one). A thread renews each
lease a few seconds before it runs out (the keeper settles the old one in full); a
refused renewal calls `on_refused(ref, why)` — the node then stops the sandbox. At the
end `settle(ref)` turns the last lease into the seconds actually used.

`call(fn)` runs `fn(keeper_handle)` and returns the keeper's answer, raising
`BudgetError` for a refusal (see `scheduler.node_gateway.NodeGateway._call`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import ray

from accounting.errors import BudgetError, SandfleetError
from sandbox.credentials import AttemptRef
from scheduler.budget import Reservation

__all__ = ["ComputeLeases"]

log = logging.getLogger(__name__)

_RENEW_AHEAD_S: Final = 5.0
_TICK_S: Final = 1.0
KeeperCall = Callable[[Callable[[Any], Any]], Any]


@dataclass
class _Lease:
    rate: Decimal
    reservation: Reservation | None
    end: float  # UNIX time the current lease pays until
    lock: threading.Lock = field(default_factory=threading.Lock)  # renew vs. settle


class ComputeLeases:
    """See the module doc. Thread-safe."""

    def __init__(
        self, call: KeeperCall, lease_s: int, on_refused: Callable[[AttemptRef, str], None]
    ) -> None:
        self._call, self.lease_s, self._on_refused = call, lease_s, on_refused
        self._leases: dict[AttemptRef, _Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="compute-leases", daemon=True)

    def start(self) -> ComputeLeases:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def open(self, ref: AttemptRef, rate_nusd_per_s: Decimal) -> None:
        """Lease the attempt's first stretch; raises BudgetError when not one second fits."""
        if rate_nusd_per_s <= 0:
            return  # free compute: nothing to lease
        res = self._call(lambda k: k.lease_compute.remote(ref, rate_nusd_per_s, self.lease_s))
        with self._lock:
            self._leases[ref] = _Lease(rate_nusd_per_s, res, time.time() + res.seconds)

    def settle(self, ref: AttemptRef) -> list[str]:
        """Settle the open lease for the seconds used; returns what went wrong (if any)."""
        with self._lock:
            lease = self._leases.pop(ref, None)
        if lease is None:
            return []
        with lease.lock:
            res, lease.reservation = lease.reservation, None
            if res is None:
                return []
            used_s = max(0.0, time.time() - (lease.end - res.seconds))
            actual = min(res.amount_nusd, math.ceil(lease.rate * Decimal(str(used_s))))
            try:
                self._call(lambda k: k.settle.remote(res.id, actual))
            except (SandfleetError, ray.exceptions.RayError, ValueError) as e:
                return [f"settling the compute lease {res.id} of {ref}: {e}"]
        return []

    def _loop(self) -> None:
        while not self._stop.wait(_TICK_S):
            now = time.time()
            with self._lock:
                due = [(ref, lease) for ref, lease in self._leases.items()
                       if lease.reservation is not None
                       and now >= lease.end - _RENEW_AHEAD_S]  # fmt: skip
            for ref, lease in due:
                self._renew(ref, lease)

    def _renew(self, ref: AttemptRef, lease: _Lease) -> None:
        with lease.lock:
            if lease.reservation is None:  # settled meanwhile: the attempt ended
                return
            old = lease.reservation.id
            try:
                res = self._call(lambda k: k.renew_lease.remote(old, self.lease_s))
            except BudgetError as e:
                lease.reservation = None  # the keeper settled the old one in full
                why = str(e)
            except (ray.exceptions.RayError, ValueError) as e:  # retried on the next tick
                log.warning("renewing the compute lease of %s failed: %s", ref, e)
                return
            else:
                lease.reservation, lease.end = res, lease.end + res.seconds
                return
        self._on_refused(ref, why)
