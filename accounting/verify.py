"""`verify(data_dir)`: prove the ledger is what its signed checkpoints say, or say what is not.

The checks, in order:

1. Checkpoints, per chain: each signature verifies with the trusted key; numbers run
   0, 1, 2, ... without a gap; each `prev` is the SHA-256 of the one before; sizes never
   shrink; nothing follows a final one.
2. Compaction manifests: signed by the same key; each replaces segments the chain
   knows, with their signed hashes, by one new segment.
3. Segment files: every segment the checkpoints and manifests expect exists with its
   signed SHA-256 (else: deleted, modified, or swapped with another one); a file nobody
   signed is accepted only as rows the newest checkpoint does not cover yet (its chain has
   a signed start and its rows come after the covered ones), else it is injected.
4. Rows: every `row_hash` matches its row's canonical encoding; per chain, `event_seq`
   runs 0..N-1 once each; the RFC 6962 Merkle root of the row hashes at each checkpoint's
   size equals the signed root (catches edits even with `row_hash` recomputed, reorders,
   removals, additions).
5. Warnings, not failures: a chain whose newest checkpoint is not final and older than
   `stale_after_s` (the tail may have been cut), rows not yet covered by a checkpoint,
   leftovers of an unfinished compaction.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from accounting.audit import (
    CHECKPOINT_DIR,
    COMPACTION_DIR,
    Checkpoint,
    document_hash,
    load_public_key,
    open_document,
    resolve_key_path,
)
from accounting.canonical import row_hashes
from accounting.errors import AuditError, ConfigError
from accounting.merkle import MerkleTree
from accounting.schemas import SCHEMAS, TABLES
from accounting.store import LedgerStore, open_store
from accounting.verify_report import ChainSummary, VerifyReport

__all__ = ["ChainSummary", "SignedState", "VerifyReport", "signed_state", "trusted_key", "verify"]

_CP_NAME: Final = re.compile(r"^(\d{12})\.json$")
_MAX_ROW_ERRORS: Final = 5


def trusted_key(public_key: Ed25519PublicKey | str | os.PathLike[str] | None) -> Ed25519PublicKey:
    """The key checkpoints must be signed with: given, or the configured signing key's."""
    if isinstance(public_key, Ed25519PublicKey):
        return public_key
    if public_key is not None:
        return load_public_key(public_key)
    path = resolve_key_path(None)
    for candidate in (path, path.with_name(path.name + ".pub")):
        if candidate.exists():
            return load_public_key(candidate)
    raise ConfigError(
        f"no audit key to verify with: {path} does not exist "
        f"(fix: pass --public-key FILE, or set $SANDFLEET_AUDIT_KEY)"
    )


@dataclass
class _Chain:
    checkpoints: list[Checkpoint] = field(default_factory=list)
    seqs: list[pa.Array] = field(default_factory=list)
    hashes: list[pa.Array] = field(default_factory=list)
    uncovered: int = 0


@dataclass
class SignedState:
    """What the signed documents say: expected segments, their replacements, problems."""

    store: LedgerStore
    key: Ed25519PublicKey
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    chains: dict[str, _Chain] = field(default_factory=lambda: defaultdict(_Chain))
    expected: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> signed ref
    leftovers: dict[str, str] = field(default_factory=dict)  # replaced path -> its sha256
    unapplied: list[str] = field(default_factory=list)  # manifests whose output never landed
    compactions: int = 0
    segments: int = 0
    charge_ids: list[pa.ChunkedArray] = field(default_factory=list)


def verify(
    data_dir: str | os.PathLike[str] | LedgerStore,
    *,
    public_key: Ed25519PublicKey | str | os.PathLike[str] | None = None,
    stale_after_s: float | None = 600.0,
    now_us: int | None = None,
) -> VerifyReport:
    """Verify every chain, segment and row under `data_dir` (see the module docstring)."""
    st = signed_state(open_store(data_dir), trusted_key(public_key))
    _check_segments(st)
    return _finish(st, stale_after_s, time.time_ns() // 1000 if now_us is None else now_us)


def signed_state(store: LedgerStore, key: Ed25519PublicKey) -> SignedState:
    """Steps 1 and 2: read and check every checkpoint and compaction manifest."""
    st = SignedState(store=store, key=key)
    _load_checkpoints(st)
    _apply_compactions(st)
    return st


# -- 1. checkpoints


def _load_checkpoints(st: SignedState) -> None:
    by_chain: dict[str, list[tuple[int, bytes]]] = defaultdict(list)
    for path in st.store.list_files(CHECKPOINT_DIR, ".json"):
        parts = path.split("/")
        m = _CP_NAME.match(parts[-1])
        if len(parts) != 4 or not m:
            st.errors.append(f"{path}: not a checkpoint file name (injected?)")
            continue
        by_chain[parts[-2]].append((int(m.group(1)), st.store.read_bytes(path)))
    for chain_id, files in sorted(by_chain.items()):
        _check_chain_checkpoints(st, chain_id, sorted(files, key=lambda f: f[0]))


def _check_chain_checkpoints(
    st: SignedState, chain_id: str, files: list[tuple[int, bytes]]
) -> None:
    chain = st.chains[chain_id]
    prev: tuple[Checkpoint, bytes] | None = None
    expected_number = 0
    for number, data in files:
        what = f"checkpoint {number} of chain {chain_id}"
        try:
            doc = open_document(data, st.key, what=what)
            cp = Checkpoint.from_document(doc)
        except AuditError as e:
            st.errors.append(str(e))
            continue
        except (KeyError, TypeError) as e:
            st.errors.append(f"{what}: malformed ({e}); it was altered")
            continue
        if cp.chain_id != chain_id or cp.number != number:
            st.errors.append(f"{what}: says it is checkpoint {cp.number} of {cp.chain_id} (moved?)")
            continue
        if number != expected_number:
            missing = (
                f"{expected_number}"
                if number == expected_number + 1
                else (f"{expected_number}..{number - 1}")
            )
            st.errors.append(f"chain {chain_id}: checkpoint {missing} is missing (deleted?)")
        elif prev is not None and cp.prev != document_hash(prev[1]):
            st.errors.append(
                f"{what}: its prev hash does not match checkpoint {prev[0].number} "
                f"(a checkpoint was replaced)"
            )
        if number == 0 and (cp.size != 0 or cp.prev is not None):
            st.errors.append(f"{what}: a genesis checkpoint must be empty (forged?)")
        if prev is not None:
            if cp.size < prev[0].size:
                st.errors.append(f"{what}: size {cp.size} shrank from {prev[0].size}")
            if prev[0].final:
                st.errors.append(f"{what}: follows the chain's final checkpoint (forged?)")
        for ref in cp.segments:
            st.expected[ref.path] = {**_ref_dict(ref), "chain_id": chain_id}
        chain.checkpoints.append(cp)
        prev = (cp, data)
        expected_number = number + 1


def _ref_dict(ref: Any) -> dict[str, Any]:
    return {"path": ref.path, "sha256": ref.sha256, "rows": ref.rows, "table": ref.table}


# -- 2. compaction manifests


def _apply_compactions(st: SignedState) -> None:
    manifests = []
    for path in st.store.list_files(COMPACTION_DIR, ".json"):
        try:
            doc = open_document(st.store.read_bytes(path), st.key, what=f"compaction {path}")
        except AuditError as e:
            st.errors.append(str(e))
            continue
        manifests.append((doc.get("time_us", 0), path, doc))
    for _, path, doc in sorted(manifests, key=lambda m: (m[0], m[1])):
        st.compactions += 1
        new = doc["segment"]
        replaced = doc["replaces"]
        unknown = [
            r for r in replaced if st.expected.get(r["path"], {}).get("sha256") != r["sha256"]
        ]
        if unknown:
            st.errors.append(
                f"compaction {path}: replaces {unknown[0]['path']}, which the audit chain "
                f"does not know with that hash (forged manifest?)"
            )
            continue
        if sum(r["rows"] for r in replaced) != new["rows"]:
            st.errors.append(f"compaction {path}: row counts do not add up")
            continue
        if not st.store.exists(new["path"]) and all(st.store.exists(r["path"]) for r in replaced):
            st.warnings.append(
                f"compaction {path} did not finish; its inputs are still in place "
                f"(fix: run `sandfleet ledger compact` again)"
            )
            st.unapplied.append(path)
            continue
        for r in replaced:
            del st.expected[r["path"]]
            st.leftovers[r["path"]] = r["sha256"]
        st.expected[new["path"]] = {**new, "chain_id": None}


# -- 3 and 4. segment files and their rows


def _check_segments(st: SignedState) -> None:
    on_disk = [p for t in TABLES for p in st.store.list_files(f"ledger/{t}", ".parquet")]
    present = set(on_disk)
    by_hash = {ref["sha256"]: path for path, ref in st.expected.items()}
    for path, signed_ref in sorted(st.expected.items()):
        if path not in present:
            st.errors.append(
                f"segment {path} is missing (deleted?); it held {signed_ref['rows']} signed rows"
            )
    for path in on_disk:
        data = st.store.read_bytes(path)
        digest = hashlib.sha256(data).hexdigest()
        ref = st.expected.get(path)
        if ref is None and st.leftovers.get(path) == digest:
            st.warnings.append(
                f"segment {path} was compacted but not yet removed "
                f"(fix: run `sandfleet ledger compact` to finish)"
            )
            continue
        st.segments += 1
        if ref is not None and ref["sha256"] != digest:
            other = by_hash.get(digest)
            if other is not None:
                st.errors.append(
                    f"segment {path} holds the content of segment {other} "
                    f"(segments swapped or moved)"
                )
            else:
                st.errors.append(
                    f"segment {path} was modified: its SHA-256 differs from the signed one"
                )
        table = path.split("/")[1]
        rows = _read_rows(st, path, data, table)
        if rows is None:
            continue
        if ref is not None and rows.num_rows != ref["rows"]:
            st.errors.append(f"segment {path} holds {rows.num_rows} rows, signed {ref['rows']}")
        _collect(st, path, table, rows, signed=ref is not None)


def _read_rows(st: SignedState, path: str, data: bytes, table: str) -> pa.Table | None:
    try:
        rows = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as e:
        st.errors.append(f"segment {path} cannot be read as Parquet: {e}")
        return None
    schema = SCHEMAS[table]
    if rows.schema.names != schema.names or not all(
        a.type == b.type for a, b in zip(rows.schema, schema, strict=True)
    ):
        st.errors.append(f"segment {path} does not have the {table} schema (injected?)")
        return None
    computed = row_hashes(table, rows)
    same = pc.equal(computed, rows["row_hash"].combine_chunks())
    if not pc.all(same).as_py():
        bad = pc.indices_nonzero(pc.invert(same)).to_pylist()
        for i in bad[:_MAX_ROW_ERRORS]:
            st.errors.append(
                f"segment {path} row {i} (chain {rows['chain_id'][i].as_py()}, seq "
                f"{rows['event_seq'][i].as_py()}): row_hash does not match the row (edited)"
            )
        if len(bad) > _MAX_ROW_ERRORS:
            st.errors.append(f"segment {path}: {len(bad) - _MAX_ROW_ERRORS} more edited rows")
    if table == "charges":
        st.charge_ids.append(rows["charge_id"])
    return (
        rows.drop_columns(["row_hash"])
        .append_column("leaf", computed)
        .select(["chain_id", "event_seq", "leaf"])
    )


def _collect(st: SignedState, path: str, table: str, rows: pa.Table, *, signed: bool) -> None:
    for chain_id in pc.unique(rows["chain_id"]).to_pylist():
        mine = (
            rows
            if rows.num_rows and _only(rows, chain_id)
            else rows.filter(pc.equal(rows["chain_id"], chain_id))
        )
        seqs = mine["event_seq"].combine_chunks()
        chain = st.chains.get(chain_id)
        if not signed:
            if chain is None or not chain.checkpoints:
                st.errors.append(
                    f"segment {path} is not in the audit chain: chain {chain_id} has no "
                    f"signed checkpoint (injected?)"
                )
                continue
            covered = chain.checkpoints[-1].size
            lo = pc.min(seqs).as_py()
            if lo < covered:
                st.errors.append(
                    f"segment {path} is not in the audit chain but holds rows of chain {chain_id} "
                    f"(seq {lo}..) that its checkpoints already cover (injected or duplicated)"
                )
                continue
            chain.uncovered += len(seqs)
        chain = st.chains[chain_id]
        chain.seqs.append(seqs)
        chain.hashes.append(mine["leaf"].combine_chunks())


def _only(rows: pa.Table, chain_id: str) -> bool:
    return bool(pc.all(pc.equal(rows["chain_id"], chain_id)).as_py())


# -- 4 (per chain) and 5


def _check_chain_rows(st: SignedState, chain_id: str, chain: _Chain) -> int:
    if not chain.seqs:
        size = chain.checkpoints[-1].size if chain.checkpoints else 0
        if size:
            st.errors.append(
                f"chain {chain_id}: its checkpoints cover {size} rows; none are present"
            )
        return 0
    seqs = pa.concat_arrays(chain.seqs)
    hashes = pa.concat_arrays(chain.hashes)
    order = pc.sort_indices(seqs)
    seqs = pc.take(seqs, order)
    n = len(seqs)
    if not chain.checkpoints:
        st.errors.append(f"chain {chain_id}: {n} rows but no signed checkpoint (deleted?)")
        return n
    first, last = seqs[0].as_py(), seqs[-1].as_py()
    unique = len(pc.unique(seqs))
    dupes, gaps = n - unique, (last + 1) - unique
    if first < 0:
        st.errors.append(f"chain {chain_id}: negative event_seq {first} (forged rows)")
    if dupes:
        st.errors.append(
            f"chain {chain_id}: {dupes} event_seq value(s) appear twice (duplicated rows)"
        )
    if gaps:
        st.errors.append(
            f"chain {chain_id}: {gaps} row(s) missing from event_seq 0..{last} (deleted rows)"
        )
    if first < 0 or dupes or gaps:
        st.errors.append(f"chain {chain_id}: Merkle roots not checked because of the rows above")
        return n
    blob = pc.take(hashes, order).buffers()[1].to_pybytes()
    tree = MerkleTree()
    for cp in chain.checkpoints:
        if cp.size > n:
            st.errors.append(
                f"chain {chain_id}: checkpoint {cp.number} covers {cp.size} rows, "
                f"only {n} are present (rows deleted)"
            )
            break
        if cp.size > tree.size:
            tree.extend_blob(blob[tree.size * 32 : cp.size * 32])
        if tree.root().hex() != cp.root:
            st.errors.append(
                f"chain {chain_id}: the rows 0..{cp.size - 1} do not give the Merkle root signed "
                f"in checkpoint {cp.number} (rows edited, reordered or replaced)"
            )
            break
    return n


def _finish(st: SignedState, stale_after_s: float | None, now_us: int) -> VerifyReport:
    summaries = []
    total = uncovered = 0
    for chain_id, chain in sorted(st.chains.items()):
        rows = _check_chain_rows(st, chain_id, chain)
        total += rows
        uncovered += chain.uncovered
        newest = chain.checkpoints[-1] if chain.checkpoints else None
        if chain.uncovered:
            st.warnings.append(
                f"chain {chain_id}: {chain.uncovered} row(s) are not yet covered by a checkpoint"
            )
        if (
            newest is not None
            and not newest.final
            and stale_after_s is not None
            and now_us - newest.time_us > stale_after_s * 1e6
        ):
            age = (now_us - newest.time_us) / 1e6
            st.warnings.append(
                f"chain {chain_id}: newest checkpoint {newest.number} is {age:.0f} s old and not "
                f"final (its writer stopped without closing, or newer checkpoints were removed)"
            )
        summaries.append(
            ChainSummary(
                chain_id=chain_id,
                rows=rows,
                covered_rows=newest.size if newest else 0,
                checkpoints=len(chain.checkpoints),
                newest_checkpoint_us=newest.time_us if newest else None,
                final=bool(newest and newest.final),
            )
        )
    _check_charge_ids(st)
    return VerifyReport(
        errors=tuple(st.errors),
        warnings=tuple(st.warnings),
        chains=tuple(summaries),
        rows=total,
        segments=st.segments,
        checkpoints=sum(len(c.checkpoints) for c in st.chains.values()),
        compactions=st.compactions,
        uncovered_rows=uncovered,
    )


def _check_charge_ids(st: SignedState) -> None:
    """A charge_id recorded twice would be counted twice: the rows are intact (a warning),
    but the reports are not (two writers raced on one retried charge)."""
    if not st.charge_ids:
        return
    ids = pa.chunked_array([c for a in st.charge_ids for c in a.chunks], pa.string())
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        shown = ", ".join(
            f"{v['values']} x{v['counts']}" for v in repeated.to_pylist()[:_MAX_ROW_ERRORS]
        )
        st.warnings.append(
            f"{len(repeated)} charge_id(s) recorded more than once ({shown}): reports count "
            f"them twice (fix: one writer per data directory, as the LedgerActor is)"
        )
