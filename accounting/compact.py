"""`compact(data_dir)`: merge small segments of a partition into large ones, rows unchanged.

Many writers flushing every second leave many small files, and every file costs a
reader time. Compaction merges the signed segments of one partition
(`ledger/<table>/day=...`) into segments of up to `target_rows` rows, keeping every
row byte-identical (all columns, `row_hash` included), ordered by (chain_id, event_seq).

The audit stays valid because rows, not files, are what the checkpoints' Merkle roots
cover, and because each merge is recorded in a signed compaction manifest
(`ledger/_compactions/<time>-<id>.json`) listing the replaced segments with their signed
SHA-256 and the new segment with its own. `verify` follows the manifests from the
checkpoints' segments to the files on disk, then checks every row as before.

Order of work, so that a crash at any point leaves a ledger that verifies:
1. verify the whole ledger first; refuse to compact one that does not verify (merging
   tampered files would launder them);
2. per group: write the manifest, then the new segment, then delete the inputs.
   A crash after 1 leaves an unapplied manifest (verify warns; the next run removes it);
   after 2, leftover inputs (verify warns and skips them; the next run deletes them).

A concurrent reader may see a group's rows twice for the instant between the new segment
appearing and its inputs being removed; dedupe on (chain_id, event_seq) if that matters.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Final

import pyarrow as pa
import pyarrow.parquet as pq

from accounting.audit import COMPACTION_DIR, key_id, load_signing_key, sign_document
from accounting.errors import AuditError
from accounting.store import LedgerStore, open_store
from accounting.verify import signed_state, verify
from accounting.writer import segment_bytes

__all__ = ["CompactionResult", "compact", "plan_groups"]

DEFAULT_TARGET_ROWS: Final = 4_000_000


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one `compact` run did."""

    groups: int
    segments_in: int
    segments_out: int
    rows: int
    leftovers_removed: int
    manifests: tuple[str, ...]

    def summary(self) -> str:
        return (
            f"compacted {self.segments_in} segments into {self.segments_out} "
            f"({self.rows} rows, {self.groups} groups); "
            f"removed {self.leftovers_removed} leftover file(s)"
        )


def plan_groups(
    segments: dict[str, dict[str, Any]], *, target_rows: int, min_segments: int = 2
) -> list[list[str]]:
    """Which segments to merge: per partition, runs of small ones up to `target_rows` rows.

    `segments` maps a segment path to its signed ref (needs `rows`). Pure: no I/O.
    """
    by_partition: dict[str, list[str]] = defaultdict(list)
    for path, ref in segments.items():
        if ref["rows"] < target_rows:
            by_partition[path.rsplit("/", 1)[0]].append(path)
    groups: list[list[str]] = []
    for _, paths in sorted(by_partition.items()):
        current: list[str] = []
        total = 0
        for path in sorted(paths):
            rows = segments[path]["rows"]
            if current and total + rows > target_rows:
                groups.append(current)
                current, total = [], 0
            current.append(path)
            total += rows
        groups.append(current)
    return [g for g in groups if len(g) >= max(2, min_segments)]


def compact(
    data_dir: str | os.PathLike[str],
    *,
    signing_key: str | os.PathLike[str] | None = None,
    target_rows: int = DEFAULT_TARGET_ROWS,
    min_segments: int = 2,
) -> CompactionResult:
    """Compact every partition of the ledger under `data_dir`; see the module docstring."""
    key = load_signing_key(signing_key, data_dir=data_dir, create=False)
    public = key.public_key()
    report = verify(data_dir, public_key=public, stale_after_s=None)
    if not report.ok:
        raise AuditError(
            f"refusing to compact a ledger that does not verify ({report.errors[0]}; "
            f"{len(report.errors)} problem(s) in all) (fix: run `sandfleet audit verify` "
            f"and investigate first)"
        )
    store = open_store(data_dir)
    st = signed_state(store, public)
    removed = _clean_up(store, st.leftovers, st.unapplied)
    groups = plan_groups(st.expected, target_rows=target_rows, min_segments=min_segments)
    manifests = []
    rows = 0
    for group in groups:
        manifest, n = _merge(store, key, group, st.expected)
        manifests.append(manifest)
        rows += n
    return CompactionResult(
        groups=len(groups),
        segments_in=sum(len(g) for g in groups),
        segments_out=len(groups),
        rows=rows,
        leftovers_removed=removed,
        manifests=tuple(manifests),
    )


def _clean_up(store: LedgerStore, leftovers: dict[str, str], unapplied: list[str]) -> int:
    """Finish what a crashed run left: delete compacted inputs and unapplied manifests."""
    removed = 0
    for path, digest in sorted(leftovers.items()):
        if store.exists(path) and hashlib.sha256(store.read_bytes(path)).hexdigest() == digest:
            store.delete(path)
            removed += 1
    for path in unapplied:
        store.delete(path)
        removed += 1
    return removed


def _merge(
    store: LedgerStore, key: Any, group: list[str], expected: dict[str, dict[str, Any]]
) -> tuple[str, int]:
    tables = []
    for path in group:
        data = store.read_bytes(path)
        if hashlib.sha256(data).hexdigest() != expected[path]["sha256"]:
            raise AuditError(
                f"segment {path} changed while compacting (fix: run `sandfleet audit verify`)"
            )
        tables.append(pq.read_table(pa.BufferReader(data)))
    merged = pa.concat_tables(tables).sort_by(
        [("chain_id", "ascending"), ("event_seq", "ascending")]
    )
    data = segment_bytes(merged)
    now_us = time.time_ns() // 1000
    ident = uuid.uuid4().hex[:12]
    partition = group[0].rsplit("/", 1)[0]
    new_path = f"{partition}/compact-{now_us}-{ident}.parquet"
    doc = {
        "kind": "compaction",
        "id": ident,
        "time_us": now_us,
        "partition": partition,
        "replaces": [
            {"path": p, "sha256": expected[p]["sha256"], "rows": expected[p]["rows"]} for p in group
        ],
        "segment": {
            "path": new_path,
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows": merged.num_rows,
            "table": expected[group[0]]["table"],
        },
        "key_id": key_id(key.public_key()),
    }
    manifest = f"{COMPACTION_DIR}/{now_us:020d}-{ident}.json"
    store.write_atomic(manifest, sign_document(doc, key), exclusive=True)
    store.write_atomic(new_path, data)
    for path in group:
        store.delete(path)
    return manifest, merged.num_rows
