"""Charge ids already recorded: a retried charge is written once.

A `charge_id` is deterministic (`accounting.charging.charge_id`): the same usage always
gets the same id, whichever process prices it and however often a call is retried.
Retries come soon after the first try: a call repeated after a timeout, a ledger actor
restarted by Ray that receives again what its previous life already wrote.
`RecentChargeIds` is the writer's memory of the ids of the last `window_s` (by the rows'
own time), at most `max_ids` of them: on the first charges it sees, it reads the ids of
that window already in the ledger (any writer's, any chain); from then on it adds every
id the writer accepts. `fresh` drops the rows whose id it knows, or that repeat an
earlier row of the same append: the first row recorded wins, nothing recorded is ever
changed.

A duplicate older than the window, or two writers appending one new id at the same
instant, is not caught here (in sandfleet every charge goes through the one
`LedgerActor`); `audit verify` reports any charge_id recorded twice.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from accounting.store import LedgerStore

__all__ = ["RecentChargeIds"]

log = logging.getLogger(__name__)

WINDOW_S: Final = 6 * 3600.0
MAX_IDS: Final = 2_000_000  # about 200 MB at most
_US: Final = 1_000_000
_DAY_US: Final = 86_400 * _US


def _days(since_us: int, until_us: int) -> list[str]:
    first, last = since_us // _DAY_US, until_us // _DAY_US
    return [time.strftime("%Y-%m-%d", time.gmtime(d * 86_400)) for d in range(first, last + 1)]


def _segments(store: LedgerStore, days: Iterable[str]) -> list[str]:
    """The charge segments of these days that a reader sees (no `.` or `_` names)."""
    return [
        p
        for day in days
        for p in store.list_files(f"ledger/charges/day={day}", ".parquet")
        if not p.rsplit("/", 1)[-1].startswith(("_", "."))
    ]


class RecentChargeIds:
    """See the module doc."""

    def __init__(
        self, store: LedgerStore, *, window_s: float = WINDOW_S, max_ids: int = MAX_IDS
    ) -> None:
        self.store = store
        self.window_us = int(window_s * _US)
        self.max_ids = max_ids
        self._ids: OrderedDict[str, int] = OrderedDict()  # id -> its row's time (µs)
        self._newest = 0
        self._seeded = False
        self.dropped = 0  # rows refused as duplicates, over this object's life

    def fresh(self, data: pa.Table, keep_out: list[bool] | None = None) -> pa.Table:
        """`data` (charges rows) without the rows whose `charge_id` is already recorded;
        `keep_out`, when given, receives one flag per row (True: kept)."""
        if data.num_rows == 0:
            return data
        if not self._seeded:
            self._seed()
        ids = data["charge_id"].to_pylist()
        times = data["time"].cast(pa.int64()).to_pylist()
        known, keep = self._ids, []
        for cid, t in zip(ids, times, strict=True):
            if cid in known:
                keep.append(False)
            else:
                keep.append(True)
                known[cid] = t
        self._newest = max(self._newest, max(times))
        self._forget_old()
        if keep_out is not None:
            keep_out[:] = keep
        dropped = len(keep) - sum(keep)
        if not dropped:
            return data
        self.dropped += dropped
        log.info("dropped %d duplicate charge row(s) (already recorded)", dropped)
        return data.filter(pa.array(keep, pa.bool_()))

    def _forget_old(self) -> None:
        ids, horizon = self._ids, self._newest - self.window_us
        while ids:
            t = ids[next(iter(ids))]
            if t >= horizon and len(ids) <= self.max_ids:
                return
            ids.popitem(last=False)

    def _seed(self) -> None:
        """The ids of the window already in the ledger, oldest first."""
        self._seeded = True
        now = time.time_ns() // 1000
        since = now - self.window_us
        paths = _segments(self.store, _days(since, now))
        if not paths:
            return
        fs, base = self.store.arrow()
        data = pq.read_table(
            [f"{base}/{p}" for p in paths], filesystem=fs, columns=["charge_id", "time"],
            partitioning=None,
        )  # fmt: skip
        t = data["time"].cast(pa.int64())
        data = data.set_column(1, "time", t).filter(pc.greater_equal(t, since))
        data = data.sort_by("time")
        for cid, t_us in zip(data["charge_id"].to_pylist(), data["time"].to_pylist(), strict=True):
            self._ids[cid] = t_us
