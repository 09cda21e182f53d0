"""Activity capture of real hardened sandboxes: every command (even one that lives a
millisecond), every file change, and resource samples whose memory peak matches what
the sandbox's script allocated — all the way into the Parquet ledger."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from helpers import fake_reader, hardened_containers

from accounting.errors import SandboxError
from accounting.pricing import load_pricing, unit_price_nusd
from accounting.schemas import Charge, Event, UsageBucket
from sandbox.activity import ActivityCapture, CaptureIdentity, Record, ledger_sink
from sandbox.capture_records import as_events
from sandbox.proc_hub import NetlinkProcHub

pytestmark = pytest.mark.docker

MiB = 1 << 20
ALLOC_MIB = 200
IDENTITY = CaptureIdentity("team-a", "batch-1", "task-7", 2, "node-x", task_type="demo")

# Holds ALLOC_MIB of touched memory until the test creates /workspace/release.
ALLOC = f"""
import os, time
b = b"x" * ({ALLOC_MIB} << 20)
open("/workspace/allocated", "w").close()
end = time.monotonic() + 120
while not os.path.exists("/workspace/release") and time.monotonic() < end:
    time.sleep(0.02)
"""
# Waits (without allocating) until the test creates /workspace/release.
WAIT = ALLOC.replace(f'b = b"x" * ({ALLOC_MIB} << 20)', "")

SCRIPT = f"""set -e
cd /workspace
echo hello > created.txt
echo more >> existing.txt
mv torename.txt renamed.txt
rm todelete.txt
/bin/echo short-lived
echo scratch > /tmp/scratch.txt
python3 -c '{ALLOC}'
exit 3
"""


def _held_s(tee: Tee) -> float:
    """Seconds between the first and the last sample that saw the allocation."""
    high = [e.time for e in tee.events("resource_sample")
            if e.payload["memory_bytes"] >= ALLOC_MIB * MiB]  # fmt: skip
    return (max(high) - min(high)).total_seconds() if len(high) >= 2 else 0.0


class Tee:
    """The sink: batches into a LedgerWriter, and into a list the test can wait on.

    It takes Arrow tables of command events (the columnar path), unless `tables` is
    False (then the capture sends `Event`s only); `records` holds them as `Event`s."""

    def __init__(
        self, downstream: Callable[[list[Any]], None] | None = None, *, tables: bool = True
    ) -> None:
        self.records: list[Record] = []
        self.tables = 0
        self.cond = threading.Condition()
        self.downstream = downstream
        self.accepts_tables = tables

    def __call__(self, batch: list[Any]) -> None:
        if self.downstream is not None:
            self.downstream(batch)
        with self.cond:
            for item in batch:
                if isinstance(item, pa.Table):
                    self.tables += 1
                    self.records.extend(as_events(item))
                else:
                    self.records.append(item)
            self.cond.notify_all()

    def events(self, kind: str) -> list[Event]:
        return [r for r in self.records if isinstance(r, Event) and r.kind == kind]

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float = 60.0) -> None:
        with self.cond:
            if not self.cond.wait_for(pred, timeout):
                pytest.fail(f"{what}: not seen within {timeout}s")


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    for name in ("existing.txt", "torename.txt", "todelete.txt"):
        (ws / name).write_text("seed\n")
    for p in (ws, *ws.iterdir()):
        os.chown(p, 10001, 10001)
    return ws


@pytest.fixture
def sandbox(docker_client: Any, workspace: Path) -> Iterator[Callable[..., Any]]:
    """Creates hardened containers (not started); removes them all afterwards."""
    with hardened_containers(
        docker_client, "activity", mem_limit="512m", memswap_limit="512m",
        tmpfs={"/tmp": "rw,noexec,nosuid,nodev,size=64m"},
        volumes={str(workspace): {"bind": "/workspace", "mode": "rw"}},
    ) as create:  # fmt: skip
        yield create


def release(workspace: Path) -> None:
    (workspace / "release").write_text("")


def commands(tee: Tee) -> dict[tuple[str, ...], dict[str, Any]]:
    """argv -> the finished command's payload."""
    return {tuple(e.payload["argv"]): dict(e.payload) for e in tee.events("command_finished")}


def test_the_ledger_holds_each_command_file_change_and_the_memory_peak_of_a_script(
    sandbox: Callable[..., Any],
    workspace: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from accounting.writer import LedgerWriter

    monkeypatch.setenv("SANDFLEET_AUDIT_KEY", str(tmp_path / "keys" / "audit.pem"))
    writer = LedgerWriter(data_dir)
    tee = Tee(ledger_sink(writer))
    container = sandbox(["sh", "-c", SCRIPT])
    # (a hub of its own that takes even a short read's commands as rows made in C)
    hub = NetlinkProcHub(columns_from=0, linger_s=0)
    capture = ActivityCapture(container.id, workspace, IDENTITY, tee, interval=0.2, hub=hub)
    try:
        with capture:
            container.start()
            tee.wait_for(
                f"samples of at least {ALLOC_MIB} MiB over one sampling interval (0.2 s)",
                lambda: _held_s(tee) >= 0.2,
            )
            release(workspace)
            assert container.wait(timeout=60)["StatusCode"] == 3
    finally:
        release(workspace)
        writer.close()
    report = capture.report
    assert report is not None and report.mode == "netlink"
    assert tee.tables > 0  # commands took the columnar path, into the ledger as tables

    # commands: each one, with argv, parent, exit status and duration
    done = commands(tee)
    short = done[("/bin/echo", "short-lived")]
    assert short["exit"] == 0 and short["duration_ms"] < 1000 and short["mode"] == "netlink"
    assert done[("mv", "torename.txt", "renamed.txt")]["exit"] == 0
    assert done[("rm", "todelete.txt")]["exit"] == 0
    assert done[("python3", "-c", ALLOC)]["exit"] == 0
    shell = done[("sh", "-c", SCRIPT)]
    assert shell["exit"] == 3 and short["ppid"] == shell["pid"]
    started = {(tuple(e.payload["argv"]), e.payload["pid"]) for e in tee.events("command_started")}
    assert started == {(argv, p["pid"]) for argv, p in done.items()}

    # file changes, in the workspace and in the sandbox's /tmp
    changes = {(e.payload["op"], e.payload["path"]): e.payload for e in tee.events("file_changed")}
    assert changes[("create", "/workspace/created.txt")]["bytes"] == 6
    assert changes[("modify", "/workspace/existing.txt")]["bytes"] == 10
    assert changes[("rename", "/workspace/renamed.txt")]["from"] == "/workspace/torename.txt"
    assert changes[("delete", "/workspace/todelete.txt")]["bytes"] == 5
    assert changes[("create", "/tmp/scratch.txt")]["bytes"] == 8

    # resources: the peak matches the allocation; the limits are the container's
    samples = [e.payload for e in tee.events("resource_sample")]
    peak = max(s["memory_bytes"] for s in samples)
    assert ALLOC_MIB * MiB <= peak <= (ALLOC_MIB + 48) * MiB
    assert ALLOC_MIB * MiB <= report.totals.memory_peak_bytes <= (ALLOC_MIB + 64) * MiB
    assert {(s["memory_limit_bytes"], s["pids_limit"], s["cpu_limit_millicores"])
            for s in samples} == {(512 * MiB, 128, 1000)}  # fmt: skip
    assert report.totals.cpu_core_seconds > 0
    # it held ALLOC_MIB over at least 0.2 s between samples (samples fall on a grid, so
    # the first gap can be shorter than the interval: the wait above covers that)
    assert report.totals.memory_gib_seconds >= Decimal(ALLOC_MIB) / 1024 * Decimal("0.2")

    # compute charges, priced from the measured totals
    prices = load_pricing()
    by_bucket = {c.usage_bucket: c for c in report.charges}
    assert set(by_bucket) == {"cpu", "memory"}
    for bucket, qty in ((UsageBucket.CPU, report.totals.cpu_core_seconds),
                        (UsageBucket.MEMORY, report.totals.memory_gib_seconds)):  # fmt: skip
        c = by_bucket[bucket.value]
        price = unit_price_nusd(prices, bucket)
        assert price is not None and c.cost_status == "final" and c.team == "team-a"
        assert c.quantity == qty.quantize(Decimal("1e-9"))
        assert c.cost_nusd == int((c.quantity * price).to_integral_value())

    # and all of it is in the ledger, as written
    ledger = ds.dataset(data_dir / "ledger" / "events", format="parquet", partitioning="hive")
    rows = ledger.to_table(columns=["kind", "task", "attempt"]).to_pylist()
    sent = [r for r in tee.records if isinstance(r, Event)]
    assert len(rows) == len(sent)
    assert {(r["task"], r["attempt"]) for r in rows} == {("task-7", 2)}
    kinds = [r["kind"] for r in rows]
    for kind in ("command_started", "command_finished", "file_changed", "resource_sample"):
        assert kinds.count(kind) == len(tee.events(kind)) > 0
    charges = ds.dataset(data_dir / "ledger" / "charges", format="parquet", partitioning="hive")
    assert charges.count_rows() == len([r for r in tee.records if isinstance(r, Charge)]) == 2


def test_a_docker_exec_is_captured_with_its_argv_and_exit_status(
    sandbox: Callable[..., Any], workspace: Path
) -> None:
    tee = Tee()
    container = sandbox(["python3", "-c", WAIT])
    with ActivityCapture(container.id, workspace, IDENTITY, tee) as capture:
        try:
            container.start()
            assert container.exec_run(["/bin/echo", "via-exec"]).exit_code == 0
            assert container.exec_run(["sh", "-c", "exit 7"]).exit_code == 7
        finally:
            release(workspace)
        container.wait(timeout=60)
    done = commands(tee)
    assert done[("/bin/echo", "via-exec")]["exit"] == 0
    assert done[("sh", "-c", "exit 7")]["exit"] == 7
    assert capture.report is not None and capture.report.commands == len(done)


def test_the_polling_fallback_sees_a_running_command_and_says_so(
    sandbox: Callable[..., Any], workspace: Path
) -> None:
    tee = Tee()
    container = sandbox(["sh", "-c", f"python3 -c '{WAIT}'; exit 0"])
    with ActivityCapture(container.id, workspace, IDENTITY, tee, proc_mode="poll") as capture:
        try:
            container.start()
            tee.wait_for(
                "python3 seen by polling",
                lambda: any(
                    e.payload["argv"][0] == "python3" for e in tee.events("command_started")
                ),
            )
        finally:
            release(workspace)
        container.wait(timeout=60)
    assert capture.report is not None and capture.report.mode == "poll"
    python = commands(tee)[("python3", "-c", WAIT)]
    assert python["mode"] == "poll" and "exit" not in python  # polling cannot know it


def test_a_sink_that_fails_is_raised_at_stop_and_nothing_is_lost(tmp_path: Path) -> None:
    calls: list[int] = []

    def refusing(batch: list[Record]) -> None:
        calls.append(len(batch))
        raise OSError("disk full")

    capture = ActivityCapture("f" * 64, tmp_path, IDENTITY, refusing, proc_mode="poll")
    capture.start()
    (tmp_path / "made.txt").write_text("x")
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)  # wait for the first delivery attempt
    with pytest.raises(SandboxError, match="disk full") as err:
        capture.stop()
    assert "`.unsent`" in str(err.value)
    assert [e.payload["path"] for e in capture.unsent if isinstance(e, Event)] == [
        "/workspace/made.txt"
    ]


def test_capture_falls_back_to_polling_when_the_connector_is_refused(tmp_path: Path) -> None:
    import sys

    refused = '{"t":"error","msg":"[Errno 1] Operation not permitted"}'
    hub = NetlinkProcHub([sys.executable, "-c", f"print({refused!r})"])
    capture = ActivityCapture("f" * 64, tmp_path, IDENTITY, Tee(), hub=hub)
    capture.start()
    report = capture.stop()
    assert report.mode == "poll"
    with pytest.raises(SandboxError, match="Operation not permitted"):
        ActivityCapture("f" * 64, tmp_path, IDENTITY, Tee(), hub=hub, proc_mode="netlink").start()


@pytest.mark.parametrize("tables", [True, False], ids=["columns", "records"])
def test_records_handed_over_just_before_stop_reach_the_sink_in_order(
    tmp_path: Path, tables: bool
) -> None:
    # a reader that answers the watch with a command's start and end, then the ack
    hub = NetlinkProcHub(fake_reader(("/bin/true", "x"), 10**9, 3 * 10**9), columns_from=0)
    tee = Tee(tables=tables)
    capture = ActivityCapture("e" * 64, tmp_path, IDENTITY, tee, hub=hub)
    capture.start()
    report = capture.stop()  # at once: what the reader sent is in the last flush
    events = [e for e in tee.records if isinstance(e, Event)]
    assert [(e.kind, e.payload["argv"], e.payload["pid"]) for e in events] == [
        ("command_started", ["/bin/true", "x"], 5),
        ("command_finished", ["/bin/true", "x"], 5),
    ]
    assert events[1].payload["exit"] == 0 and events[1].payload["duration_ms"] == 2000
    assert events[0].time < events[1].time
    assert report.commands == 1 and report.mode == "netlink"
    assert tee.tables == (1 if tables else 0)
