"""The reaper: remove every labelled sandbox and workspace whose attempt is not live.

After a crash, a cancel or a lost driver, nothing is left behind: `reap()` lists the
containers labelled `sandfleet.managed=1` and the workspaces under
`DATA/workspaces/`, asks `is_live(owner)` of each (default: the owner process still
runs on this host, see liveness.py) and removes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from accounting.errors import SandfleetError
from sandbox.backend import SandboxBackend
from sandbox.container_spec import LABEL_BATCH, LABEL_MANAGED, LABEL_OWNER
from sandbox.liveness import owner_is_live
from sandbox.workspace import read_owner, remove_workspace

__all__ = ["ReapReport", "reap", "workspace_roots"]

IsLive = Callable[[str | None], bool]
_FRESH_S = 60.0


@dataclass(frozen=True)
class ReapReport:
    """What the reaper removed, what it kept (live) and what it could not remove."""

    containers_removed: tuple[str, ...]
    workspaces_removed: tuple[str, ...]
    kept: int
    failures: tuple[str, ...]


def workspace_roots(data_dir: str | Path, batch: str | None = None) -> Iterator[Path]:
    """Every attempt directory `DATA/workspaces/<batch>/<task>/<attempt>` (of one batch)."""
    base = Path(data_dir) / "workspaces"
    batches = [base / batch] if batch else sorted(p for p in base.glob("*") if p.is_dir())
    for b in batches:
        for attempt in sorted(b.glob("*/*")):
            if attempt.is_dir():
                yield attempt


def _just_made(root: Path) -> bool:
    """A workspace without owner.json younger than a minute may be mid-creation: keep it."""
    try:
        return time.time() - root.stat().st_mtime < _FRESH_S
    except FileNotFoundError:
        return False


def reap(
    backend: SandboxBackend,
    data_dir: str | Path,
    *,
    is_live: IsLive = owner_is_live,
    labels: Mapping[str, str] | None = None,
) -> ReapReport:
    """Remove dead attempts' containers, then their workspaces.

    `labels` narrows the sweep (tests pass their own batch label); a `sandfleet.batch`
    label also narrows the workspaces to that batch.
    """
    removed_c: list[str] = []
    removed_w: list[str] = []
    failures: list[str] = []
    kept = 0
    for info in backend.list({LABEL_MANAGED: "1", **(labels or {})}):
        if is_live(info.labels.get(LABEL_OWNER)):
            kept += 1
            continue
        try:
            backend.remove(info.id)
            removed_c.append(info.name)
        except SandfleetError as e:
            failures.append(f"container {info.name}: {e}")
    batch = (labels or {}).get(LABEL_BATCH)
    for root in workspace_roots(data_dir, batch):
        owner = read_owner(root)
        if is_live(owner) or (owner is None and _just_made(root)):
            kept += 1
            continue
        try:
            remove_workspace(root)
            removed_w.append(str(root))
        except SandfleetError as e:
            failures.append(f"workspace {root}: {e}")
    return ReapReport(tuple(removed_c), tuple(removed_w), kept, tuple(failures))
