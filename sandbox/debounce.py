"""Debouncing raw file changes into the ones worth a ledger row (pure, no clock of its own).

A burst of writes to one path is one change, reported once the path has been quiet for
`quiet_ns`, or `max_delay_ns` after the burst began (a file written continuously is
still reported, every `max_delay_ns`). A create followed by writes is one `create`.
Deletes and renames are reported at once, after anything still pending for their paths
(and, for a directory, for the paths under it), so each path's changes keep their order.
A change keeps the time of its first raw event.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Debouncer", "RawChange"]


@dataclass(frozen=True, slots=True)
class RawChange:
    """One change as inotify reported it. Directory paths end with `/`."""

    mono_ns: int
    op: str  # create, modify, delete, rename
    path: str
    src: str | None = None  # rename: where it came from


@dataclass(slots=True)
class _Pending:
    op: str
    first_ns: int
    last_ns: int


class Debouncer:
    """Coalesces creates and modifications per path; passes deletes and renames through."""

    def __init__(self, quiet_ns: int, max_delay_ns: int) -> None:
        self.quiet_ns = quiet_ns
        self.max_delay_ns = max_delay_ns
        self._pending: dict[str, _Pending] = {}

    def add(self, raw: RawChange) -> list[RawChange]:
        """Take one raw change; returns the changes that are due because of it."""
        if raw.op in ("create", "modify"):
            p = self._pending.get(raw.path)
            if p is None:
                self._pending[raw.path] = _Pending(raw.op, raw.mono_ns, raw.mono_ns)
            else:
                p.last_ns = max(p.last_ns, raw.mono_ns)
                if raw.op == "create":
                    p.op = "create"
            return []
        out = self._flush_under(raw.path)
        if raw.src is not None:
            out += self._flush_under(raw.src)
        out.append(raw)
        return out

    def _flush_under(self, path: str) -> list[RawChange]:
        is_dir = path.endswith("/")  # a directory: it and everything under it
        keys = [k for k in self._pending if k.startswith(path)] if is_dir else [path]
        return [self._emit(k) for k in sorted(keys) if k in self._pending]

    def _emit(self, path: str) -> RawChange:
        p = self._pending.pop(path)
        return RawChange(p.first_ns, p.op, path)

    def due(self, now_ns: int) -> list[RawChange]:
        """Changes whose path has been quiet long enough, or waited long enough."""
        ready = [
            k
            for k, p in self._pending.items()
            if now_ns - p.last_ns >= self.quiet_ns or now_ns - p.first_ns >= self.max_delay_ns
        ]
        return [self._emit(k) for k in sorted(ready, key=lambda k: self._pending[k].first_ns)]

    def next_due_ns(self) -> int | None:
        """When the next pending change falls due (None: nothing pending)."""
        return min(
            (min(p.last_ns + self.quiet_ns, p.first_ns + self.max_delay_ns)
             for p in self._pending.values()),
            default=None,
        )  # fmt: skip

    def drain(self) -> list[RawChange]:
        """Everything still pending, oldest first (at stop)."""
        keys = sorted(self._pending, key=lambda k: self._pending[k].first_ns)
        return [self._emit(k) for k in keys]

    def __len__(self) -> int:
        return len(self._pending)
