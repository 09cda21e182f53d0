"""Small C helpers, compiled on first use: `compiled(source)` returns the built file.

sandfleet ships a few C sources beside its Python (the ledger's batch SHA-256, the
process-events reader). Each is compiled with the system's `cc` into `build_dir()`,
under a name that hashes the source and the flags, so an edited source is never run
stale; the build writes a temporary file and renames it, so concurrent builders never
see half a binary; `bpf_object(source)` does the same for an eBPF program (clang).
`make setup` builds them ahead (`python -m accounting.native`). Every caller has a
pure-Python path for a machine without a compiler: a native helper makes things
faster, never different.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from accounting.errors import SandfleetError

__all__ = ["NativeBuildError", "SharedLibrary", "bpf_object", "build_dir", "compiled"]

log = logging.getLogger(__name__)

_CFLAGS: Final = ("-O2", "-Wall", "-Wextra")
_BPF_CFLAGS: Final = ("-g", "-O2", "-target", "bpf", "-Wall")  # -g: the BTF CO-RE needs


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
    source: Path,
    *,
    shared: bool = False,
    libs: Sequence[str] = (),
    defines: Sequence[str] = (),
    depends: Sequence[Path] = (),
) -> Path:
    """The executable (or, with `shared`, the shared library) built from `source`,
    compiling it first unless it is already built from this very source and flags.

    `depends` are the headers it includes: an edit of one rebuilds it too. Raises
    `NativeBuildError` naming the fix when there is no C compiler or it fails.
    """
    flags = [*_CFLAGS, *defines, *(("-shared", "-fPIC") if shared else ())]
    target = _target(source, [*flags, *libs], depends, ".so" if shared else "")
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NativeBuildError(
            f"no C compiler to build {source.name} (fix: `apt-get install gcc`; "
            "the slower Python path is used meanwhile)"
        )
    _build(target, lambda out: [cc, *flags, "-o", out, str(source), *libs], source)
    return target


class SharedLibrary:
    """A helper library, built and loaded on first use, once per process: `get()` is the
    loaded library, or None when it cannot be built or loaded (said once in the log,
    then the caller's Python path runs). `declare` gives its functions their C types."""

    def __init__(
        self, build: Callable[[], Path], declare: Callable[[ctypes.CDLL], None], what: str
    ) -> None:
        self._build, self._declare, self.what = build, declare, what
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False

    def get(self) -> ctypes.CDLL | None:
        if self._tried:  # the hot path: no lock once decided
            return self._lib
        with self._lock:
            if not self._tried:
                try:
                    lib = ctypes.CDLL(str(self._build()))
                    self._declare(lib)
                    self._lib = lib
                except (NativeBuildError, OSError) as e:
                    log.warning("native %s unavailable (%s); using Python", self.what, e)
                finally:
                    self._tried = True  # after `_lib`: the unlocked check sees it whole
        return self._lib


def bpf_object(source: Path, *, defines: Sequence[str] = (), depends: Sequence[Path] = ()) -> Path:
    """The eBPF object file built from `source` by clang (`-target bpf`, with BTF for
    CO-RE), compiling it first unless it is already built from this very source.

    Raises `NativeBuildError` naming the fix when there is no clang or it fails.
    """
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    flags = [*_BPF_CFLAGS, f"-I/usr/include/{multiarch}", *defines]
    target = _target(source, flags, depends, ".o")
    if target.exists():
        return target
    names = ("clang", *(f"clang-{n}" for n in range(20, 10, -1)))  # Debian's versioned ones
    clang = os.environ.get("BPF_CLANG") or next(filter(None, map(shutil.which, names)), None)
    if clang is None:
        raise NativeBuildError(
            f"no clang to build the eBPF program {source.name} (fix: `apt-get install clang "
            "libbpf-dev`, or `make setup`)"
        )
    _build(target, lambda out: [clang, *flags, "-c", str(source), "-o", out], source)
    return target


def _target(source: Path, flags: Sequence[str], depends: Sequence[Path], suffix: str) -> Path:
    """Where `source` built with `flags` lives: named after a hash of all it is made of."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode())
    for dep in depends:  # (none: the same name as before `depends` existed)
        digest.update(b"\0" + dep.read_bytes())
    return build_dir() / f"{source.stem}-{digest.hexdigest()[:16]}{suffix}"


def _build(target: Path, command: Callable[[str], list[str]], source: Path) -> None:
    """Run `command(temporary path)`, then rename its output to `target`: a concurrent
    builder finds a whole file or none."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", dir=target.parent)
    os.close(fd)
    try:
        argv = command(tmp)
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativeBuildError(
                f"compiling {source} failed ({argv[0]} exited {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable, like any in /usr/bin
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
