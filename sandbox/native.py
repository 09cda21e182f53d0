"""The native process-events reader (`sandbox/native/procmon.c`), compiled on demand.

`procmon_path()` returns the compiled reader, compiling it first (`cc -O2`) when there
is none for the current source; None when it cannot be had (no compiler, or the
compile failed: the reason is logged) — `sandbox.proc_hub` then runs the Python reader
(`python -m sandbox.proc_events`), which does the same work for far more CPU.

Binaries live in `build/native/` at the project root (or `$SANDFLEET_NATIVE_DIR`), named
after a hash of the source, so an edited source is never run stale. `make setup` builds
it ahead (`python -m sandbox.native`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Final

from accounting.errors import SandboxError

__all__ = ["SOURCE", "build_procmon", "procmon_path"]

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).resolve().parent / "native" / "procmon.c"
_CFLAGS: Final = ("-O2", "-Wall", "-Wextra")


def _build_dir() -> Path:
    env = os.environ.get("SANDFLEET_NATIVE_DIR")
    return Path(env) if env else SOURCE.parent.parent.parent / "build" / "native"


def _target(source: Path) -> Path:
    digest = hashlib.sha256(source.read_bytes() + " ".join(_CFLAGS).encode()).hexdigest()
    return _build_dir() / f"procmon-{digest[:16]}"


def build_procmon(source: Path = SOURCE) -> Path:
    """Compile the reader unless it is already built from this source; its path.

    Raises `SandboxError` naming the fix when there is no C compiler or it fails.
    """
    target = _target(source)
    if os.access(target, os.X_OK):
        return target
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SandboxError(
            "no C compiler for the native process-events reader; fix: "
            "`apt-get install gcc` (the Python reader is used meanwhile)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".procmon-", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run(
            [cc, *_CFLAGS, "-o", tmp, str(source)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise SandboxError(
                f"compiling {source} failed ({cc} exited {done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable, like any in /usr/bin
        os.replace(tmp, target)  # atomic: a concurrent build finds a whole binary or none
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def procmon_path() -> Path | None:
    """The native reader, compiled if need be; None when it cannot be built."""
    if not SOURCE.exists():
        return None
    try:
        return build_procmon()
    except (SandboxError, OSError) as e:
        log.warning("native process-events reader unavailable (%s); using the Python one", e)
        return None


def main() -> int:
    try:
        path = build_procmon()
    except (SandboxError, OSError) as e:
        print(f"setup: {e}", file=sys.stderr)
        return 0  # not fatal: command capture runs the Python reader
    print(f"setup: native process-events reader {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
