"""`FakeBackend`: a faithful in-memory `SandboxBackend` for fast tests above the seam.

It keeps Docker's observable behaviour — ids, names that must be unique, labels,
created/running/exited states, idempotent remove, separate stdout/stderr, exit codes,
`oom` apart from the exit code, kill at the timeout — without an engine and without
real time: sleeps advance a virtual clock, so a thousand sandboxes run in milliseconds.

The main command is interpreted by a tiny shell (`sh -c 'a; b'` or a plain argv):
`echo WORDS [>FILE | >>FILE | >&2]`, `cat FILE`, `sleep SECONDS`, `exit N`, `true`,
`false`, and `sandfleet-fake-oom` (the kernel's OOM killer ends the sandbox). FILE paths
under the workspace mount reach the bind-mounted host directory, as in Docker;
other paths are read-only. Anything else is "not found" (exit 127). Pass `run=` to script
a sandbox's outcome yourself.
"""

from __future__ import annotations

import itertools
import shlex
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from accounting.errors import ImageError, SandboxError
from sandbox.backend import (
    ExecResult,
    SandboxInfo,
    SandboxSpec,
    SandboxStatus,
    Stats,
    Stream,
    WaitResult,
)

__all__ = ["FakeBackend", "FakeRun"]

OOM_COMMAND = "sandfleet-fake-oom"


@dataclass(frozen=True)
class FakeRun:
    """A scripted outcome: what the sandbox prints, how long it runs, how it ends."""

    stdout: bytes = b""
    stderr: bytes = b""
    exit_code: int = 0
    duration_s: float = 0.0
    oom: bool = False


@dataclass
class _Box:
    id: str
    spec: SandboxSpec
    status: SandboxStatus = SandboxStatus.CREATED
    result: WaitResult | None = None
    out: dict[str, bytearray] = field(
        default_factory=lambda: {"stdout": bytearray(), "stderr": bytearray()}
    )


class _Shell:
    """The tiny shell. Runs statements until the virtual clock passes `budget_s`."""

    def __init__(self, spec: SandboxSpec, budget_s: float | None) -> None:
        self.spec = spec
        self.budget_s = budget_s
        self.clock = 0.0
        self.out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self.binds = {
            bind["bind"]: Path(host)
            for host, bind in dict(spec.kwargs.get("volumes") or {}).items()
        }
        self.cwd = str(spec.kwargs.get("working_dir") or "/")

    def run(self, argv: Sequence[str]) -> FakeRun:
        if len(argv) >= 3 and argv[0] in {"sh", "bash", "/bin/sh"} and argv[1] == "-c":
            statements = [s for s in argv[2].replace("\n", ";").split(";") if s.strip()]
        else:
            statements = [shlex.join(argv)]
        code = 0
        for statement in statements:
            step = self._statement(shlex.split(statement))
            if isinstance(step, FakeRun):
                return step
            code = step
            if self.budget_s is not None and self.clock > self.budget_s:
                break
        return self._result(code)

    def _result(self, code: int, *, oom: bool = False) -> FakeRun:
        return FakeRun(bytes(self.out["stdout"]), bytes(self.out["stderr"]), code, self.clock, oom)

    def _statement(self, words: list[str]) -> int | FakeRun:
        if not words:
            return 0
        cmd, args = words[0], words[1:]
        if cmd == "exit":
            return self._result(int(args[0]) if args else 0)
        if cmd == OOM_COMMAND:
            return self._result(137, oom=True)
        if cmd in {"true", ":"}:
            return 0
        if cmd == "false":
            return 1
        if cmd == "sleep":
            self.clock += float(args[0]) if args else 0.0
            return 0
        if cmd == "echo":
            return self._echo(args)
        if cmd == "cat":
            return self._cat(args)
        self.out["stderr"] += f"sh: 1: {cmd}: not found\n".encode()
        return 127

    def _echo(self, args: list[str]) -> int:
        target, mode = "stdout", ""
        if args and args[-1] == ">&2":
            target, args = "stderr", args[:-1]
        elif len(args) >= 2 and args[-2] in {">", ">>"}:
            mode, target, args = args[-2], args[-1], args[:-2]
        text = (" ".join(args) + "\n").encode()
        if not mode:
            self.out[target] += text
            return 0
        path = self._host_path(target)
        if path is None:
            self.out["stderr"] += f"sh: 1: cannot create {target}: Read-only file system\n".encode()
            return 2
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab" if mode == ">>" else "wb") as f:
            f.write(text)
        return 0

    def _cat(self, args: list[str]) -> int:
        code = 0
        for name in args:
            path = self._host_path(name)
            if path is None or not path.is_file():
                self.out["stderr"] += f"cat: {name}: No such file or directory\n".encode()
                code = 1
                continue
            self.out["stdout"] += path.read_bytes()
        return code

    def _host_path(self, name: str) -> Path | None:
        full = name if name.startswith("/") else f"{self.cwd.rstrip('/')}/{name}"
        for mount, host in self.binds.items():
            if full == mount or full.startswith(mount.rstrip("/") + "/"):
                rel = full[len(mount) :].lstrip("/")
                if ".." in Path(rel).parts:
                    return None
                return host / rel
        return None


class FakeBackend:
    """In-memory sandboxes. `images=None` accepts any image; `run` scripts outcomes."""

    def __init__(
        self,
        *,
        images: set[str] | None = None,
        run: Callable[[SandboxSpec], FakeRun | None] | None = None,
    ) -> None:
        self.images = images
        self.run = run
        self._boxes: dict[str, _Box] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self.created_total = 0

    # -- lifecycle ---------------------------------------------------------------

    def create(self, spec: SandboxSpec) -> str:
        with self._lock:
            if self.images is not None and spec.image not in self.images:
                raise ImageError(
                    f"cannot create sandbox {spec.name} from {spec.image}: image missing; "
                    "fix: run `sandfleet images build` (or `make setup`)"
                )
            if any(b.spec.name == spec.name for b in self._boxes.values()):
                raise SandboxError(
                    f"Docker refused to create sandbox {spec.name}: the name is already in use"
                )
            box_id = f"fake{next(self._ids):060d}"
            self._boxes[box_id] = _Box(id=box_id, spec=spec)
            self.created_total += 1
            return box_id

    def start(self, sandbox_id: str) -> None:
        with self._lock:
            box = self._box(sandbox_id, "start sandbox")
            if box.status is SandboxStatus.CREATED:
                box.status = SandboxStatus.RUNNING

    def exec(self, sandbox_id: str, argv: Sequence[str]) -> ExecResult:
        with self._lock:
            box = self._box(sandbox_id, f"exec {list(argv)!r} in sandbox")
            if box.status is not SandboxStatus.RUNNING:
                raise SandboxError(
                    f"Docker refused to exec {list(argv)!r} in sandbox {sandbox_id[:12]}: "
                    f"container is not running"
                )
            done = _Shell(box.spec, None).run(argv)
        return ExecResult(exit_code=done.exit_code, stdout=done.stdout, stderr=done.stderr)

    def wait(self, sandbox_id: str, timeout: float | None = None) -> WaitResult:
        with self._lock:
            box = self._box(sandbox_id, "wait for sandbox")
            if box.status is SandboxStatus.CREATED:
                raise SandboxError(f"cannot wait for sandbox {sandbox_id[:12]}: never started")
            if box.result is None:
                self._finish(box, self._outcome(box.spec, timeout), timeout)
            assert box.result is not None
            return box.result

    def logs(self, sandbox_id: str, stream: Stream, *, follow: bool = False) -> Iterator[bytes]:
        with self._lock:
            box = self._box(sandbox_id, f"read the {stream} of sandbox")
            while follow and box.status is SandboxStatus.RUNNING:
                self._lock.wait()
            data = bytes(box.out[stream])
        if data:
            yield data

    def stop(self, sandbox_id: str, grace_s: float = 0.0) -> None:
        with self._lock:
            box = self._box(sandbox_id, "stop sandbox")
            if box.status is SandboxStatus.RUNNING:
                self._finish(box, FakeRun(exit_code=137), None, killed=True)

    def remove(self, sandbox_id: str) -> None:
        with self._lock:
            box = self._boxes.pop(sandbox_id, None)
            if box is not None and box.status is SandboxStatus.RUNNING:
                self._finish(box, FakeRun(exit_code=137), None, killed=True)

    def stats(self, sandbox_id: str) -> Stats:
        with self._lock:
            box = self._box(sandbox_id, "sample sandbox stats")
            limit = int(box.spec.kwargs.get("mem_limit") or 0)
            running = box.status is SandboxStatus.RUNNING
            return Stats(cpu_ns=0, memory_bytes=0, memory_limit_bytes=limit,
                         memory_peak_bytes=0, pids=1 if running else 0)  # fmt: skip

    def list(self, labels: Mapping[str, str]) -> list[SandboxInfo]:
        with self._lock:
            return [
                SandboxInfo(id=b.id, name=b.spec.name, status=b.status, labels=b.spec.labels)
                for b in self._boxes.values()
                if all(b.spec.labels.get(k) == v for k, v in labels.items())
            ]

    # -- helpers -----------------------------------------------------------------

    def _box(self, sandbox_id: str, action: str) -> _Box:
        box = self._boxes.get(sandbox_id)
        if box is None:
            raise SandboxError(
                f"cannot {action} {sandbox_id[:12]}: no such sandbox; "
                "it was removed (by `sandfleet sandbox reap`?) or never created"
            )
        return box

    def _outcome(self, spec: SandboxSpec, timeout: float | None) -> FakeRun:
        scripted = self.run(spec) if self.run else None
        return scripted or _Shell(spec, timeout).run(spec.command or ("true",))

    def _finish(
        self, box: _Box, run: FakeRun, timeout: float | None, *, killed: bool = False
    ) -> None:
        timed_out = timeout is not None and run.duration_s > timeout
        box.out["stdout"] += run.stdout
        box.out["stderr"] += run.stderr
        box.result = WaitResult(
            exit_code=137 if timed_out or killed else run.exit_code,
            oom=run.oom and not timed_out,
            timed_out=timed_out,
            duration_s=min(run.duration_s, timeout) if timeout is not None else run.duration_s,
        )
        box.status = SandboxStatus.EXITED
        self._lock.notify_all()
