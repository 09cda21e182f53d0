"""The audit chain's signed documents: checkpoints, compaction manifests, and their key.

A checkpoint (`ledger/_checkpoints/<chain_id>/<number>.json`) says, for one writer's
chain: how many rows it holds so far (`size`), the RFC 6962 Merkle root of their row
hashes in `event_seq` order, the SHA-256 of the previous checkpoint file (`prev`), the
segments written since the previous checkpoint (path, SHA-256, rows, first and last
seq), the time, and whether it is the chain's last one (`final`). Checkpoint 0 (the
genesis, size 0) is written before the chain's first segment, so every real chain has
a signed start. A compaction manifest (`ledger/_compactions/<time>-<id>.json`) says
which segments one compacted segment replaces, with every file's SHA-256.

Both are canonical JSON (sorted keys, no spaces) with an Ed25519 `signature` over the
rest. The signing key lives outside the data directory: the `key` argument, else
`$SANDFLEET_AUDIT_KEY`, else `~/.config/sandfleet/audit-ed25519.key`; it is created
(mode 0600, with its public half beside it as `.pub`) on first use. `verify()` lives in
`accounting.verify` and is re-exported here.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from accounting.errors import AuditError, ConfigError

if TYPE_CHECKING:
    from accounting.store import LedgerStore
    from accounting.verify import VerifyReport

__all__ = [
    "CHECKPOINT_DIR",
    "COMPACTION_DIR",
    "DEFAULT_KEY_PATH",
    "Checkpoint",
    "SegmentRef",
    "checkpoint_path",
    "document_hash",
    "key_id",
    "load_public_key",
    "load_signing_key",
    "open_document",
    "public_pem",
    "resolve_key_path",
    "sign_document",
    "verify",
]

DEFAULT_KEY_PATH: Final = Path("~/.config/sandfleet/audit-ed25519.key")
CHECKPOINT_DIR: Final = "ledger/_checkpoints"
COMPACTION_DIR: Final = "ledger/_compactions"
FORMAT: Final = "sandfleet.audit.v1"


@dataclass(frozen=True, slots=True)
class SegmentRef:
    """One segment file as a checkpoint or manifest records it."""

    path: str
    sha256: str
    rows: int
    table: str
    first_seq: int
    last_seq: int


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The signed state of one chain after `size` rows."""

    chain_id: str
    number: int
    size: int
    root: str
    prev: str | None
    time_us: int
    node: str
    final: bool
    segments: tuple[SegmentRef, ...]
    key_id: str

    def to_document(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["segments"] = [asdict(s) for s in self.segments]
        doc["kind"] = "checkpoint"
        return doc

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> Checkpoint:
        fields = {k: doc[k] for k in cls.__slots__ if k != "segments"}
        return cls(**fields, segments=tuple(SegmentRef(**s) for s in doc["segments"]))


def checkpoint_path(chain_id: str, number: int) -> str:
    """Where checkpoint `number` of `chain_id` lives, relative to the data directory."""
    return f"{CHECKPOINT_DIR}/{chain_id}/{number:012d}.json"


# -- keys


def resolve_key_path(key: str | os.PathLike[str] | None = None) -> Path:
    """The signing key's path: `key`, else `$SANDFLEET_AUDIT_KEY`, else the default."""
    value = os.fspath(key) if key else os.environ.get("SANDFLEET_AUDIT_KEY") or DEFAULT_KEY_PATH
    return Path(value).expanduser().resolve()


def _check_outside(path: Path, data_dir: str | os.PathLike[str] | None) -> None:
    if not isinstance(data_dir, str | os.PathLike) or "://" in os.fspath(data_dir):
        return
    root = Path(data_dir).expanduser().resolve()
    if path == root or root in path.parents:
        raise ConfigError(
            f"audit key {path} is inside the data directory {root}; whoever can edit the "
            f"ledger could then re-sign it (fix: keep the key elsewhere, e.g. {DEFAULT_KEY_PATH})"
        )


def _create_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):  # another process won the race: use its key
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_signing_key(
    key: str | os.PathLike[str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    create: bool = True,
) -> Ed25519PrivateKey:
    """The Ed25519 signing key at `resolve_key_path(key)`, created (0600) if missing."""
    path = resolve_key_path(key)
    _check_outside(path, data_dir)
    if not path.exists():
        if not create:
            raise ConfigError(
                f"audit key {path} does not exist (fix: pass --key with the key the "
                f"ledger's writers sign with, or set $SANDFLEET_AUDIT_KEY)"
            )
        _create_key(path)
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"audit key {path} is readable by others (fix: chmod 600 {path})")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"audit key {path} is not a PEM private key: {e} (fix: check the path)"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ConfigError(f"audit key {path} is not an Ed25519 key (fix: use an Ed25519 key)")
    pub = path.with_name(path.name + ".pub")
    if not pub.exists():
        pub.write_bytes(public_pem(loaded.public_key()))
    return loaded


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    """The public key as PEM (SubjectPublicKeyInfo), as written beside the private key."""
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """A verifying key from a PEM public key, or the public half of a PEM private key."""
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"audit key {p}: cannot read: {e.strerror} (fix: check the path)"
        ) from None
    try:
        loaded: Any = (
            serialization.load_pem_private_key(data, password=None).public_key()
            if b"PRIVATE KEY" in data
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as e:
        raise ConfigError(f"audit key {p} is not a PEM key: {e} (fix: check the path)") from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(f"audit key {p} is not an Ed25519 key (fix: use an Ed25519 key)")
    return loaded


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short fingerprint of a public key (first 8 bytes of SHA-256 of its raw form)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signed documents


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign_document(doc: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """`doc` as canonical JSON with an Ed25519 signature over everything else in it."""
    body = {**doc, "format": FORMAT}
    signature = key.sign(_canonical(body))
    return _canonical({**body, "signature": base64.b64encode(signature).decode()})


def open_document(data: bytes, public_key: Ed25519PublicKey, *, what: str) -> dict[str, Any]:
    """The document inside signed bytes, or `AuditError` naming `what` and the problem."""
    try:
        doc = json.loads(data)
        signature = base64.b64decode(doc.pop("signature"), validate=True)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise AuditError(f"{what}: not a signed sandfleet document ({e}); it was altered") from None
    if doc.get("format") != FORMAT:
        raise AuditError(f"{what}: unknown format {doc.get('format')!r}; it was altered")
    try:
        public_key.verify(signature, _canonical(doc))
    except InvalidSignature:
        raise AuditError(
            f"{what}: signature does not verify with the trusted key {key_id(public_key)} "
            f"(signed with another key, or edited after signing)"
        ) from None
    return doc


def document_hash(data: bytes) -> str:
    """SHA-256 (hex) of a signed document's bytes: what the next checkpoint's `prev` holds."""
    return hashlib.sha256(data).hexdigest()


def verify(
    data_dir: str | os.PathLike[str] | LedgerStore,
    *,
    public_key: Ed25519PublicKey | str | os.PathLike[str] | None = None,
    stale_after_s: float | None = 600.0,
) -> VerifyReport:
    """Check the whole ledger under `data_dir`; see `accounting.verify.verify`."""
    from accounting.verify import verify as _verify

    return _verify(data_dir, public_key=public_key, stale_after_s=stale_after_s)
