"""SHA-256 of many small messages at once: the ledger's row hashes and Merkle nodes.

`sha256_each(values)` hashes every value of an Arrow binary array; `node_hashes(blob)`
hashes each consecutive pair of 32-byte hashes as an RFC 6962 interior node. Both return
the digests as one `bytes` of 32 bytes each. They run the native helper
(`accounting/native/sha256.c`, OpenSSL's SHA-256 in one C loop) when it can be built and
loaded, and the same loop in Python otherwise -- about ten times slower, bit for bit
the same. `backend()` says which one runs.
"""

from __future__ import annotations

import ctypes
import hashlib
from itertools import pairwise
from pathlib import Path
from typing import Final

import pyarrow as pa

from accounting.native import SharedLibrary, compiled

__all__ = ["backend", "build", "node_hashes", "sha256_each"]

SOURCE: Final = Path(__file__).resolve().parent / "native" / "sha256.c"
_FLAGS: Final = ("-Wno-deprecated-declarations",)  # SHA256_Init: deprecated, still the fastest


def build() -> Path:
    """Compile the helper unless already built; its path (raises `NativeBuildError`)."""
    return compiled(SOURCE, shared=True, libs=("-lcrypto",), defines=_FLAGS)


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.sandfleet_sha256_each.argtypes = [ptr, ptr, i64, ptr]
    lib.sandfleet_sha256_pairs.argtypes = [ptr, i64, ptr]


_LIBRARY: Final = SharedLibrary(build, _declare, "SHA-256")
_load = _LIBRARY.get


def backend() -> str:
    """`native` or `python`: which implementation hashes."""
    return "native" if _load() is not None else "python"


def sha256_each(values: pa.Array) -> bytes:
    """SHA-256 of every value of a binary array (no nulls), 32 bytes each, in order."""
    n = len(values)
    if n == 0:
        return b""
    if values.type != pa.binary():
        raise TypeError(f"sha256_each takes a binary array, not {values.type}")
    if values.null_count:
        raise ValueError("sha256_each: the array has nulls")
    _, offsets, data = values.buffers()
    lib = _load()
    if lib is None or data is None:
        offs = memoryview(offsets).cast("i")[values.offset : values.offset + n + 1].tolist()
        view, sha = memoryview(data or b""), hashlib.sha256
        return b"".join([sha(view[a:b]).digest() for a, b in pairwise(offs)])
    out = bytearray(32 * n)
    target = (ctypes.c_char * len(out)).from_buffer(out)
    lib.sandfleet_sha256_each(data.address, offsets.address + 4 * values.offset, n, target)
    return bytes(out)


def node_hashes(blob: bytes) -> bytes:
    """SHA-256(0x01 || left || right) of each consecutive pair of 32-byte hashes."""
    pairs = len(blob) // 64
    if pairs * 64 != len(blob):
        raise ValueError("node_hashes takes an even number of 32-byte hashes")
    if pairs == 0:
        return b""
    lib = _load()
    if lib is None:
        view, sha = memoryview(blob), hashlib.sha256
        return b"".join([sha(b"\x01" + view[i : i + 64]).digest() for i in range(0, len(blob), 64)])
    out = bytearray(32 * pairs)
    lib.sandfleet_sha256_pairs(blob, pairs, (ctypes.c_char * len(out)).from_buffer(out))
    return bytes(out)
