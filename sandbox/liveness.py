"""Who owns a sandbox, and whether that owner is still alive.

Every container and workspace records its owner: `<host>:<pid>:<start-ticks>` of the
process running the attempt (start ticks from /proc/<pid>/stat tell a reused pid apart).
An attempt is live while its owner process runs; the reaper removes the rest.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Owner", "current_owner", "owner_is_live"]


@dataclass(frozen=True)
class Owner:
    """The process that owns a sandbox attempt."""

    host: str
    pid: int
    start_ticks: int

    def token(self) -> str:
        return f"{self.host}:{self.pid}:{self.start_ticks}"

    @classmethod
    def parse(cls, token: str) -> Owner | None:
        """`host:pid:ticks` -> Owner, or None when the token is malformed."""
        host, _, rest = token.rpartition(":")
        host, _, pid = host.rpartition(":")
        if not host or not pid.isdigit() or not rest.isdigit():
            return None
        return cls(host=host, pid=int(pid), start_ticks=int(rest))


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 overall


def current_owner() -> Owner:
    """This process as an owner."""
    pid = os.getpid()
    return Owner(host=socket.gethostname(), pid=pid, start_ticks=_start_ticks(pid) or 0)


def owner_is_live(token: str | None) -> bool:
    """True while the owner process runs on this host.

    Owners on other hosts are reported live: this host cannot judge them, and a reaper
    must never remove what it cannot prove dead. A missing or malformed token is not live.
    """
    owner = Owner.parse(token or "")
    if owner is None:
        return False
    if owner.host != socket.gethostname():
        return True
    ticks = _start_ticks(owner.pid)
    return ticks is not None and ticks == owner.start_ticks
