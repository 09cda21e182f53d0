"""Small C helpers, compiled on first use: `compiled(source)` returns the built file.

sandfleet ships a few C sources beside its Python (the ledger's batch SHA-256, the
process-events reader). Each is compiled with the system's `cc` into `build_dir()`,
under a name that hashes the source and the flags, so an edited source is never run
stale; the build writes a temporary file and renames it, so concurrent builders never
see half a binary. `make setup` builds
them ahead (`python -m accounting.native`). Every caller has a pure-Python path for a
machine without a compiler: a native helper makes things faster, never different.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from accounting.errors import SandfleetError

__all__ = ["NativeBuildError", "build_dir", "compiled"]

_CFLAGS: Final = ("-O2", "-Wall", "-Wextra")


class NativeBuildError(SandfleetError):
    """A C helper could not be compiled (no compiler, or the compile failed)."""


def build_dir() -> Path:
    """`$SANDFLEET_NATIVE_DIR`; else `build/native` in a source checkout; else the user's
    cache (`~/.cache/sandfleet/native`, as for a `pip install`ed sandfleet)."""
    env = os.environ.get("SANDFLEET_NATIVE_DIR")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").exists():
        return root / "build" / "native"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sandfleet" / "native"


def compiled(
    source: Path, *, shared: bool = False, libs: Sequence[str] = (), defines: Sequence[str] = ()
) -> Path:
    """The executable (or, with `shared`, the shared library) built from `source`,
    compiling it first unless it is already built from this very source and flags.

    Raises `NativeBuildError` naming the fix when there is no C compiler or it fails.
    """
    flags = [*_CFLAGS, *defines, *(("-shared", "-fPIC") if shared else ())]
    digest = hashlib.sha256(source.read_bytes() + " ".join([*flags, *libs]).encode())
    target = build_dir() / f"{source.stem}-{digest.hexdigest()[:16]}{'.so' if shared else ''}"
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NativeBuildError(
            f"no C compiler to build {source.name} (fix: `apt-get install gcc`; "
            "the slower Python path is used meanwhile)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *flags, "-o", tmp, str(source), *libs], capture_output=True, text=True,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise NativeBuildError(
                f"compiling {source} failed ({cc} exited {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable, like any in /usr/bin
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def main() -> int:
    """`make setup`: build the ledger's helpers now; a failure is reported, not fatal."""
    from accounting import hashing

    try:
        print(f"setup: native ledger SHA-256: {hashing.build()}")
    except (NativeBuildError, OSError) as e:
        print(f"setup: native ledger SHA-256 unavailable, Python hashes: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
