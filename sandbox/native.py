"""The native command readers, compiled on demand.

- the eBPF reader (`sandbox/native/ebpfmon.bpf.c`, the kernel side, built by clang;
  `ebpfmon.c`, its libbpf loader): `ebpfmon_argv()` is how to run it, None when it
  cannot be built (no clang or libbpf: the reason is logged);
- the connector reader (`sandbox/native/procmon.c`): `procmon_path()` returns it,
  compiling it first (`cc -O2`) when there is none for the current source; None when
  it cannot be had (no compiler, or the compile failed: the reason is logged).

`sandbox.proc_hub` runs the first that can be had and starts, else the Python reader
(`python -m sandbox.proc_events`), which does the connector's work for far more CPU.

`records_library()` loads the decoder of their records (`sandbox/native/records.c`, a
shared library: a run of command records as one Arrow batch of ledger `events` rows,
`sandbox.event_rows.EventDecoder`); None without a compiler, and then the same decoding
runs in Python.

Both readers include `native/reader_common.h` (the records they write, the table of
watched containers, the /proc reads). Binaries live in `accounting.native.build_dir()`
(`build/native/` in a checkout, or `$SANDFLEET_NATIVE_DIR`), named after a hash of the
source and the headers it includes, so an edited source or header is never run stale.
`make setup` builds them ahead (`python -m sandbox.native`).
"""

from __future__ import annotations

import ctypes
import logging
import sys
from pathlib import Path
from typing import Final

from accounting.errors import SandboxError
from accounting.native import NativeBuildError, SharedLibrary, bpf_object, compiled

__all__ = [
    "EBPF_LOADER",
    "EBPF_PROGRAM",
    "READER_HEADER",
    "RECORDS",
    "SOURCE",
    "build_ebpfmon",
    "build_procmon",
    "build_records",
    "ebpfmon_argv",
    "procmon_path",
    "records_library",
]

log = logging.getLogger(__name__)

SOURCE: Final = Path(__file__).resolve().parent / "native" / "procmon.c"
EBPF_PROGRAM: Final = SOURCE.parent / "ebpfmon.bpf.c"
EBPF_LOADER: Final = SOURCE.parent / "ebpfmon.c"
EBPF_HEADER: Final = SOURCE.parent / "ebpfmon.h"
READER_HEADER: Final = SOURCE.parent / "reader_common.h"
RECORDS: Final = SOURCE.parent / "records.c"


def build_procmon(source: Path = SOURCE) -> Path:
    """Compile the reader unless it is already built from this source; its path.

    Raises `SandboxError` naming the fix when there is no C compiler or it fails.
    """
    try:
        return compiled(source, depends=[READER_HEADER])
    except NativeBuildError as e:
        raise SandboxError(
            f"the native process-events reader cannot be built: {e} (the Python reader is "
            "used meanwhile)"
        ) from e


def procmon_path() -> Path | None:
    """The native reader, compiled if need be; None when it cannot be built."""
    if not SOURCE.exists():
        return None
    try:
        return build_procmon()
    except (SandboxError, OSError) as e:
        log.warning("native process-events reader unavailable (%s); using the Python one", e)
        return None


def build_ebpfmon(program: Path = EBPF_PROGRAM, loader: Path = EBPF_LOADER) -> list[str]:
    """Build the eBPF reader unless it is built from these sources; how to run it
    (`[loader, program object]`).

    Raises `SandboxError` naming the fix when clang, a C compiler or libbpf is missing,
    or a compile fails.
    """
    try:
        obj = bpf_object(program, depends=[EBPF_HEADER])
        exe = compiled(loader, libs=["-lbpf"], depends=[EBPF_HEADER, READER_HEADER])
    except NativeBuildError as e:
        raise SandboxError(
            f"the eBPF command reader cannot be built: {e} (fix: `make setup`, which runs "
            "`apt-get install clang libbpf-dev gcc`)"
        ) from e
    return [str(exe), str(obj)]


def ebpfmon_argv() -> list[str] | None:
    """The eBPF reader's command line, built if need be; None when it cannot be built."""
    if not (EBPF_PROGRAM.exists() and EBPF_LOADER.exists()):
        return None
    try:
        return build_ebpfmon()
    except (SandboxError, OSError) as e:
        log.warning("eBPF command reader unavailable (%s); using the connector's", e)
        return None


def build_records() -> Path:
    """Compile the records decoder unless already built; its path (`NativeBuildError`)."""
    return compiled(RECORDS, shared=True)


def _declare_records(lib: ctypes.CDLL) -> None:
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64  # (see records.c)
    fn = lib.sandfleet_decode_events
    fn.argtypes = [p, i64, i64, p, p, i32, p, p, p, p]
    fn.restype = i64


_RECORDS_LIBRARY: Final = SharedLibrary(build_records, _declare_records, "records decoder")


def records_library() -> ctypes.CDLL | None:
    """The records decoder, built and loaded once; None when it cannot be (logged)."""
    return _RECORDS_LIBRARY.get()


def main() -> int:
    """`make setup`: build both readers now; a failure is reported, not fatal."""
    try:
        print(f"setup: eBPF command reader {' '.join(build_ebpfmon())}")
    except (SandboxError, OSError) as e:
        print(f"setup: {e}", file=sys.stderr)  # not fatal: the connector reader runs
    try:
        print(f"setup: native process-events reader {build_procmon()}")
    except (SandboxError, OSError) as e:
        print(f"setup: {e}", file=sys.stderr)  # not fatal: the Python reader runs
    try:
        print(f"setup: native records decoder {build_records()}")
    except (NativeBuildError, OSError) as e:
        print(f"setup: records decoder unavailable, Python decodes: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
