"""RFC 6962 Merkle tree hash, computed incrementally.

Leaf hash = SHA-256(0x00 || entry), node hash = SHA-256(0x01 || left || right), the
tree of n leaves splits at the largest power of two below n, and the empty tree hashes
to SHA-256(""). The ledger's entries are its rows: a row's `row_hash` already is
SHA-256(0x00 || canonical encoding) (see `accounting.canonical`), so it is the leaf hash.

`MerkleTree` keeps only the roots of the perfect subtrees that make up the leaves so far
(one per set bit of the size), so appending is O(1) amortised and the root of any
prefix size is available as the leaves arrive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

from accounting.hashing import node_hashes

__all__ = ["EMPTY_ROOT", "MerkleTree", "leaf_hash", "merkle_root", "node_hash"]

EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    """RFC 6962 leaf hash of one entry."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class MerkleTree:
    """The Merkle tree hash of a growing list of leaf hashes."""

    __slots__ = ("_by_height", "size")

    def __init__(self) -> None:
        self.size = 0
        self._by_height: dict[int, bytes] = {}  # height -> root of a perfect subtree

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash (32 bytes)."""
        self.extend((leaf,))

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Add leaf hashes in order, level by level (one hash per new interior node)."""
        items = list(leaves)
        self.size += len(items)
        self._push(items, 0)

    def extend_blob(self, blob: bytes) -> None:
        """Add leaf hashes given as one buffer of 32-byte hashes (the fast path: each
        level is hashed in one call, `accounting.hashing.node_hashes`)."""
        n = len(blob) // 32
        if n * 32 != len(blob):
            raise ValueError("a blob of leaf hashes must be a multiple of 32 bytes long")
        self.size += n
        level = 0
        while blob:
            carry = self._by_height.pop(level, None)
            if carry is not None:
                blob = carry + blob
            if (len(blob) // 32) % 2:
                self._by_height[level] = blob[-32:]
                blob = blob[:-32]
            blob = node_hashes(blob)
            level += 1

    def _push(self, items: list[bytes], level: int) -> None:
        sha = hashlib.sha256
        while items:
            carry = self._by_height.pop(level, None)
            if carry is not None:
                items = [carry, *items]
            if len(items) % 2:
                self._by_height[level] = items.pop()
            it = iter(items)
            items = [sha(b"\x01" + a + b).digest() for a, b in zip(it, it, strict=True)]
            level += 1

    def root(self) -> bytes:
        """The RFC 6962 Merkle tree hash of all leaves so far."""
        if not self._by_height:
            return EMPTY_ROOT
        acc: bytes | None = None
        for height in sorted(self._by_height):
            sub = self._by_height[height]
            acc = sub if acc is None else node_hash(sub, acc)
        assert acc is not None
        return acc

    def copy(self) -> MerkleTree:
        """An independent copy (to compute a root without disturbing this tree)."""
        other = MerkleTree()
        other.size = self.size
        other._by_height = dict(self._by_height)
        return other


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of `leaves` (leaf hashes), recursively: the reference."""
    n = len(leaves)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaves[0]
    k = 1
    while k * 2 < n:
        k *= 2
    return node_hash(merkle_root(leaves[:k]), merkle_root(leaves[k:]))
