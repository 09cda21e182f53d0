"""The native batch SHA-256 and the Python path give the same digests, bit for bit."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from accounting import hashing
from accounting.merkle import MerkleTree, leaf_hash, merkle_root


@pytest.fixture(params=["native", "python"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(hashing, "_load", lambda: None)
    yield request.param


def test_the_native_helper_builds_and_loads_here() -> None:
    # this machine has cc and OpenSSL's headers (make setup builds it): it must not fall back
    assert hashing.build().exists()
    assert hashing.backend() == "native"


def test_each_value_is_hashed_in_order_even_in_a_slice(backend: str) -> None:
    values = [b"", b"a", b"\x00\xff" * 40, "é".encode() * 1000, b"x"]
    arr = pa.array(values * 3, pa.binary())
    assert hashing.backend() == backend
    assert hashing.sha256_each(arr) == b"".join(hashlib.sha256(v).digest() for v in values * 3)
    part = arr.slice(4, 6)
    assert hashing.sha256_each(part) == b"".join(
        hashlib.sha256(v).digest() for v in part.to_pylist()
    )
    assert hashing.sha256_each(pa.array([], pa.binary())) == b""


def test_bad_input_is_refused_with_what_is_wrong() -> None:
    with pytest.raises(TypeError, match="binary array"):
        hashing.sha256_each(pa.array(["text"]))
    with pytest.raises(ValueError, match="nulls"):
        hashing.sha256_each(pa.array([b"a", None], pa.binary()))
    with pytest.raises(ValueError, match="even number"):
        hashing.node_hashes(b"\x00" * 96)


def test_node_hashes_are_rfc6962_interior_nodes(backend: str) -> None:
    leaves = [hashlib.sha256(bytes([i])).digest() for i in range(6)]
    got = hashing.node_hashes(b"".join(leaves))
    want = b"".join(
        hashlib.sha256(b"\x01" + leaves[i] + leaves[i + 1]).digest() for i in range(0, 6, 2)
    )
    assert got == want


@given(sizes=st.lists(st.integers(0, 70), min_size=1, max_size=6))
def test_a_tree_fed_in_blobs_has_the_reference_root(sizes: list[int]) -> None:
    tree, leaves = MerkleTree(), []
    for k in sizes:
        new = [leaf_hash(f"{len(leaves) + i}".encode()) for i in range(k)]
        leaves += new
        tree.extend_blob(b"".join(new))
        assert tree.root() == merkle_root(leaves)
    assert tree.size == len(leaves)


def test_a_library_that_cannot_be_built_is_tried_once_and_python_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from accounting.native import NativeBuildError, SharedLibrary

    builds: list[int] = []

    def build() -> Path:
        builds.append(1)
        raise NativeBuildError("cc: not found")

    library = SharedLibrary(build, lambda lib: None, "test helper")
    assert library.get() is None and library.get() is None
    assert builds == [1]  # decided once: the hot path never builds again
    assert "native test helper unavailable (cc: not found)" in caplog.text
    loaded = SharedLibrary(hashing.build, lambda lib: None, "SHA-256")
    assert loaded.get() is not None and loaded.get() is loaded.get()
