"""The fleet queue: which queued attempt runs next. Pure Python, deterministic, no Ray.

Order of admission:

1. **Priority.** Higher `priority` first, across all teams. When an item of the top
   priority does not fit the free cluster capacity, nothing of a lower priority is
   admitted in that round either (small low-priority work never starves big urgent work).
2. **Weighted fair share** between the teams that have work at that priority: the team
   with the lowest `running sandboxes / weight` goes next; ties go to the team whose
   name sorts first. When every team is busy, running sandboxes converge to the weights.
3. **Quotas** per team (`TeamPolicy`): concurrent sandboxes, CPUs, memory. A team at
   its quota waits (with all its lower-priority work) while the others go on. Within a
   team and priority, items run in push order.

Every operation is O(1) or O(log n) in the number of queued items (a round of
`pop_admissible` costs O(teams) per admission); cancelled items are dropped lazily.
The queue only counts: the caller starts attempts for the returned admissions, stops
the sandboxes of cancelled running items, and calls `release` when an attempt ends.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from accounting.errors import ConfigError, SchedulerError

__all__ = [
    "Admission",
    "Backlog",
    "Cancelled",
    "Capacity",
    "FleetQueue",
    "QueueItem",
    "QueueStats",
    "TeamPolicy",
    "TeamStats",
]

UNLIMITED = 1 << 62


@dataclass(frozen=True, slots=True)
class TeamPolicy:
    """A team's share of the fleet: fair-share weight and hard concurrency quotas."""

    weight: float = 1.0
    max_sandboxes: int | None = None
    max_cpus: float | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ConfigError(f"team policy: weight {self.weight} must be > 0 (fix: use e.g. 1)")
        for name in ("max_sandboxes", "max_cpus", "max_memory_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"team policy: {name} {value} is negative (fix: use >= 0)")


@dataclass(frozen=True, slots=True)
class QueueItem:
    """One attempt waiting for (or holding) a sandbox."""

    task_id: str
    batch: str
    team: str
    priority: int = 0
    cpus: float = 1.0
    memory_bytes: int = 0
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Capacity:
    """Free cluster resources offered to one `pop_admissible` round."""

    slots: int
    cpus: float = float(UNLIMITED)
    memory_bytes: int = UNLIMITED


@dataclass(frozen=True, slots=True)
class Admission:
    """An item admitted to run; `seq` counts admissions over the queue's life (1-based)."""

    item: QueueItem
    seq: int


@dataclass(frozen=True, slots=True)
class Cancelled:
    """What a cancel touched: items removed from the queue, items still running."""

    removed: tuple[QueueItem, ...]
    running: tuple[QueueItem, ...]


@dataclass(frozen=True, slots=True)
class Backlog:
    """Admissible demand for the autoscaler, in sandboxes.

    `queued` counts queued items the team quotas would let run now if the cluster had
    room; `demand` = running + queued is the floor to ask of the autoscaler.
    """

    running: int
    queued: int
    by_team: Mapping[str, int] = field(default_factory=dict)

    @property
    def demand(self) -> int:
        return self.running + self.queued


@dataclass(frozen=True, slots=True)
class TeamStats:
    queued: int
    running: int
    running_cpus: float
    running_memory_bytes: int
    admitted: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    queued: int
    running: int
    admitted: int
    cancelled: int
    teams: Mapping[str, TeamStats]


class _Usage:
    """Running totals of one team (CPUs in thousandths, to add and subtract exactly)."""

    __slots__ = ("admitted", "memory", "millicpus", "sandboxes")

    def __init__(self) -> None:
        self.sandboxes = 0
        self.millicpus = 0
        self.memory = 0
        self.admitted = 0


def _milli(cpus: float) -> int:
    return round(cpus * 1000)


class FleetQueue:
    """Priority, weighted fair share and quotas over queued attempts (see module doc)."""

    def __init__(
        self,
        policies: Mapping[str, TeamPolicy] | None = None,
        default_policy: TeamPolicy | None = None,
    ) -> None:
        self._policies = dict(policies or {})
        self._default = default_policy or TeamPolicy()
        self._queued: dict[str, QueueItem] = {}
        self._running: dict[str, QueueItem] = {}
        self._lanes: dict[int, dict[str, deque[QueueItem]]] = {}
        self._live: dict[tuple[int, str], int] = {}
        self._priorities: list[int] = []  # negated, ascending: highest priority first
        self._usage: dict[str, _Usage] = {}
        self._admitted = 0
        self._cancelled = 0

    def __len__(self) -> int:
        return len(self._queued)

    def policy(self, team: str) -> TeamPolicy:
        return self._policies.get(team, self._default)

    def push(self, item: QueueItem) -> None:
        """Queue an attempt; its task must be neither queued nor running."""
        if item.task_id in self._queued or item.task_id in self._running:
            where = "queued" if item.task_id in self._queued else "running"
            raise SchedulerError(
                f"task {item.task_id!r} is already {where} (fix: release or cancel it "
                "before queueing another attempt)"
            )
        if item.cpus < 0 or item.memory_bytes < 0:
            raise SchedulerError(f"task {item.task_id!r}: negative cpus or memory_bytes")
        self._check_fits_quota(item)
        lanes = self._lanes.get(item.priority)
        if lanes is None:
            lanes = self._lanes[item.priority] = {}
            bisect.insort(self._priorities, -item.priority)
        lane = lanes.get(item.team)
        if lane is None:
            lane = lanes[item.team] = deque()
        lane.append(item)
        key = (item.priority, item.team)
        self._live[key] = self._live.get(key, 0) + 1
        self._queued[item.task_id] = item

    def push_many(self, items: Iterable[QueueItem]) -> None:
        for item in items:
            self.push(item)

    def pop_admissible(self, free: Capacity) -> list[Admission]:
        """Admit what fits `free` and the quotas, in priority then fair-share order."""
        slots, millicpus, memory = free.slots, _milli(free.cpus), free.memory_bytes
        out: list[Admission] = []
        quota_blocked: set[str] = set()
        for neg in list(self._priorities):
            if slots <= 0:
                break
            priority = -neg
            capacity_blocked: set[str] = set()
            while slots > 0:
                team = self._fairest(priority, quota_blocked | capacity_blocked)
                if team is None:
                    break
                item = self._head(priority, team)
                if not self._fits_quota(item):
                    quota_blocked.add(team)
                    continue
                need = _milli(item.cpus)
                if need > millicpus or item.memory_bytes > memory:
                    capacity_blocked.add(team)
                    continue
                self._remove_queued(item)
                self._start(item)
                slots, millicpus, memory = slots - 1, millicpus - need, memory - item.memory_bytes
                out.append(Admission(item, self._admitted))
            if capacity_blocked:
                break
        return out

    def release(self, task_id: str) -> QueueItem:
        """An attempt ended (any outcome): give its sandbox, CPUs and memory back."""
        item = self._running.pop(task_id, None)
        if item is None:
            raise SchedulerError(
                f"task {task_id!r} is not running (fix: release each admitted attempt once)"
            )
        usage = self._usage[item.team]
        usage.sandboxes -= 1
        usage.millicpus -= _milli(item.cpus)
        usage.memory -= item.memory_bytes
        return item

    def cancel(self, *, task_id: str | None = None, batch: str | None = None) -> Cancelled:
        """Drop a task's or a batch's queued items; report its running ones to stop."""
        if (task_id is None) == (batch is None):
            raise SchedulerError("cancel: give exactly one of task_id or batch")
        if task_id is not None:
            queued = [self._queued[task_id]] if task_id in self._queued else []
            running = [self._running[task_id]] if task_id in self._running else []
        else:
            queued = [i for i in self._queued.values() if i.batch == batch]
            running = [i for i in self._running.values() if i.batch == batch]
        for item in queued:
            self._remove_queued(item)
        self._cancelled += len(queued)
        return Cancelled(tuple(queued), tuple(running))

    def running(self, batch: str | None = None) -> list[QueueItem]:
        """Running items (of one batch), in admission order."""
        return [i for i in self._running.values() if batch is None or i.batch == batch]

    def backlog(self, limit: int | None = None) -> Backlog:
        """Queued sandboxes the quotas admit now; counting stops at `limit` in all."""
        room = UNLIMITED if limit is None else max(0, limit)
        by_team: dict[str, int] = {}
        for team in sorted({t for lanes in self._lanes.values() for t in lanes}):
            n = self._admissible(team, room)
            if n:
                by_team[team] = n
                room -= n
        return Backlog(len(self._running), sum(by_team.values()), by_team)

    def stats(self) -> QueueStats:
        queued: dict[str, int] = {}
        for (_, team), n in self._live.items():
            queued[team] = queued.get(team, 0) + n
        teams = {
            team: TeamStats(
                queued=queued.get(team, 0),
                running=u.sandboxes,
                running_cpus=u.millicpus / 1000,
                running_memory_bytes=u.memory,
                admitted=u.admitted,
            )
            for team, u in sorted(self._usage.items())
        }
        for team in sorted(queued.keys() - teams.keys()):
            teams[team] = TeamStats(queued[team], 0, 0.0, 0, 0)
        return QueueStats(
            queued=len(self._queued),
            running=len(self._running),
            admitted=self._admitted,
            cancelled=self._cancelled,
            teams=dict(sorted(teams.items())),
        )

    # -- internals -----------------------------------------------------------------

    def _check_fits_quota(self, item: QueueItem) -> None:
        p = self.policy(item.team)
        too_big = [
            f"{name} {need} > {cap}"
            for name, need, cap in (
                ("sandboxes", 1, p.max_sandboxes),
                ("cpus", item.cpus, p.max_cpus),
                ("memory_bytes", item.memory_bytes, p.max_memory_bytes),
            )
            if cap is not None and need > cap
        ]
        if too_big:
            raise SchedulerError(
                f"task {item.task_id!r} can never run: team {item.team!r} quota "
                f"({', '.join(too_big)}) (fix: raise the team's quota in configs/policies.yaml "
                "or use a smaller template)"
            )

    def _fits_quota(self, item: QueueItem) -> bool:
        p = self.policy(item.team)
        u = self._usage.get(item.team)
        if u is None:
            return True
        return (
            (p.max_sandboxes is None or u.sandboxes + 1 <= p.max_sandboxes)
            and (p.max_cpus is None or u.millicpus + _milli(item.cpus) <= _milli(p.max_cpus))
            and (p.max_memory_bytes is None or u.memory + item.memory_bytes <= p.max_memory_bytes)
        )

    def _fairest(self, priority: int, skip: set[str]) -> str | None:
        """The team at `priority` with the lowest running/weight (name breaks ties)."""
        best: tuple[float, str] | None = None
        for team in self._lanes.get(priority, {}):
            if team in skip:
                continue
            u = self._usage.get(team)
            key = ((u.sandboxes if u else 0) / self.policy(team).weight, team)
            if best is None or key < best:
                best = key
        return None if best is None else best[1]

    def _head(self, priority: int, team: str) -> QueueItem:
        lane = self._lanes[priority][team]
        while self._queued.get(lane[0].task_id) is not lane[0]:
            lane.popleft()  # cancelled earlier
        return lane[0]

    def _remove_queued(self, item: QueueItem) -> None:
        """Forget a queued item; its lane entry is dropped now or when it reaches the head."""
        del self._queued[item.task_id]
        key = (item.priority, item.team)
        self._live[key] -= 1
        lanes = self._lanes[item.priority]
        lane = lanes[item.team]
        if self._live[key] == 0:
            del self._live[key], lanes[item.team]
            if not lanes:
                del self._lanes[item.priority]
                self._priorities.pop(bisect.bisect_left(self._priorities, -item.priority))
        elif lane[0] is item:
            lane.popleft()
        elif len(lane) > 2 * self._live[key] + 64:
            lanes[item.team] = deque(i for i in lane if self._queued.get(i.task_id) is i)

    def _start(self, item: QueueItem) -> None:
        usage = self._usage.get(item.team)
        if usage is None:
            usage = self._usage[item.team] = _Usage()
        usage.sandboxes += 1
        usage.millicpus += _milli(item.cpus)
        usage.memory += item.memory_bytes
        usage.admitted += 1
        self._admitted += 1
        self._running[item.task_id] = item

    def _admissible(self, team: str, room: int) -> int:
        """How many of `team`'s queued items its quota admits now, in order, up to `room`."""
        p = self.policy(team)
        u = self._usage.get(team) or _Usage()
        queued = sum(n for (_, t), n in self._live.items() if t == team)
        if p.max_sandboxes is not None:
            room = min(room, p.max_sandboxes - u.sandboxes)
        if p.max_cpus is None and p.max_memory_bytes is None:
            return max(0, min(room, queued))
        cpu_room = UNLIMITED if p.max_cpus is None else _milli(p.max_cpus) - u.millicpus
        mem_room = UNLIMITED if p.max_memory_bytes is None else p.max_memory_bytes - u.memory
        n = 0
        for neg in self._priorities:
            for item in self._lanes[-neg].get(team, ()):
                if n >= room:
                    return n
                if self._queued.get(item.task_id) is not item:
                    continue
                cpu_room -= _milli(item.cpus)
                mem_room -= item.memory_bytes
                if cpu_room < 0 or mem_room < 0:
                    return n
                n += 1
        return n
