"""Command capture without an engine: the connector's wire format, the process table
that tells a sandbox's processes from the host's, and the polling fallback."""

from __future__ import annotations

import struct
from pathlib import Path

from helpers import fake_reader

from sandbox.proc_events import _kernel_filters_events, listen_message, parse_datagram
from sandbox.proc_poll import PollTracker
from sandbox.proc_table import (
    EV_EXEC,
    EV_EXIT,
    EV_FORK,
    REC_ACK,
    REC_LOST,
    CaptureMode,
    CommandFinished,
    CommandStarted,
    ContainerEmpty,
    ProcessTable,
    ProcEvent,
    Record,
    SysProcReader,
    container_id_of,
    decode_exit,
    pack_control,
    pack_record,
    unpack_records,
)

CID = "a" * 64
OTHER = "b" * 64


def datagram(what: int, ts: int, body: bytes) -> bytes:
    """One connector message as the kernel sends it."""
    event = struct.pack("=IIQ", what, 0, ts) + body
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


class FakeProc:
    """A /proc that knows a few processes; records what was read."""

    def __init__(self) -> None:
        self.cmdlines: dict[int, tuple[str, ...]] = {}
        self.cgroups: dict[int, str] = {}
        self.ppids: dict[int, int] = {}
        self.reads: list[tuple[str, int]] = []

    def cmdline(self, pid: int) -> tuple[str, ...] | None:
        self.reads.append(("cmdline", pid))
        return self.cmdlines.get(pid)

    def cgroup(self, pid: int) -> str | None:
        self.reads.append(("cgroup", pid))
        return self.cgroups.get(pid)

    def ppid(self, pid: int) -> int | None:
        return self.ppids.get(pid)


def cgroup_of(cid: str) -> str:
    return f"4:memory:/docker/{cid}\n1:cpu:/docker/{cid}\n0::/\n"


def fork(parent: int, child: int, ts: int = 1, thread_of: int | None = None) -> ProcEvent:
    tgid = thread_of if thread_of is not None else child
    return ProcEvent(EV_FORK, ts, child, tgid, parent_tgid=parent)


def exec_(pid: int, ts: int = 2) -> ProcEvent:
    return ProcEvent(EV_EXEC, ts, pid, pid)


def exit_(pid: int, status: int = 0, ts: int = 3, tgid: int | None = None) -> ProcEvent:
    return ProcEvent(EV_EXIT, ts, pid, tgid if tgid is not None else pid, exit_status=status)


# -- the wire format ---------------------------------------------------------------------


def test_fork_exec_and_exit_messages_are_parsed_and_other_kinds_skipped() -> None:
    data = (
        datagram(EV_FORK, 10, struct.pack("=IIII", 5, 5, 6, 6))
        + datagram(EV_EXEC, 11, struct.pack("=II", 6, 6))
        + datagram(0x200, 12, b"\0" * 24)  # a comm event
        + datagram(EV_EXIT, 13, struct.pack("=IIIIII", 6, 6, 3 << 8, 17, 5, 5))
    )
    events = parse_datagram(data)
    assert events == [
        ProcEvent(EV_FORK, 10, 6, 6, parent_tgid=5),
        ProcEvent(EV_EXEC, 11, 6, 6),
        ProcEvent(EV_EXIT, 13, 6, 6, exit_status=3 << 8),
    ]


def test_a_truncated_message_is_ignored_not_misread() -> None:
    whole = datagram(EV_EXEC, 11, struct.pack("=II", 6, 6))
    assert parse_datagram(whole[:-4]) == []
    assert parse_datagram(b"") == []


def test_the_listen_message_carries_the_event_mask_only_when_asked() -> None:
    plain, masked = listen_message(True), listen_message(True, EV_FORK | EV_EXEC | EV_EXIT)
    assert len(plain) == 16 + 20 + 4 and len(masked) == 16 + 20 + 8
    assert struct.unpack_from("=I", plain, 0)[0] == len(plain)
    assert struct.unpack_from("=II", plain, 16) == (1, 1)  # CN_IDX_PROC, CN_VAL_PROC
    assert struct.unpack_from("=I", plain, 36) == (1,)  # PROC_CN_MCAST_LISTEN
    assert struct.unpack_from("=II", masked, 36) == (1, EV_FORK | EV_EXEC | EV_EXIT)
    assert struct.unpack_from("=I", listen_message(False), 36) == (2,)  # IGNORE


def test_only_kernels_from_6_6_are_sent_an_event_mask() -> None:
    assert _kernel_filters_events("6.18.44-fc-v595")
    assert _kernel_filters_events("6.6.0")
    assert not _kernel_filters_events("6.1.0-18-amd64")
    assert not _kernel_filters_events("5.15.0")


def test_wait_status_becomes_exit_code_or_minus_the_signal() -> None:
    assert decode_exit(0) == 0
    assert decode_exit(3 << 8) == 3
    assert decode_exit(9) == -9
    assert decode_exit(0x80 | 11) == -11  # core dumped


def test_container_id_is_found_in_cgroupfs_and_systemd_paths_but_not_on_the_host() -> None:
    assert container_id_of(cgroup_of(CID)) == CID
    assert container_id_of(f"0::/system.slice/docker-{CID}.scope\n") == CID
    assert container_id_of("4:memory:/user.slice\n0::/\n") is None


def test_records_survive_the_pipe_between_reader_and_parent() -> None:
    records: list[Record] = [
        CommandStarted(6, 5, ("ls", "-l"), 100, CaptureMode.NETLINK),
        CommandFinished(6, 5, ("ls", "-l"), 100, 2_000_100, 0, CaptureMode.NETLINK),
        CommandFinished(6, 5, ("sh",), 100, 200, None, CaptureMode.NETLINK),
        CommandFinished(6, 5, ("sh", "-c", "a\nb\tc ü"), 100, 200, -9, CaptureMode.NETLINK),
        CommandStarted(7, 6, (), 300, CaptureMode.NETLINK),
        ContainerEmpty(300),
    ]
    wire = b"".join(pack_record(CID, rec) for rec in records)
    decoded, used = unpack_records(wire)
    assert used == len(wire)
    assert [(kind, cid) for kind, cid, _ in decoded] == [(k, CID) for k in (1, 2, 2, 2, 1, 3)]
    assert [rec for _, _, rec in decoded] == records


def test_a_record_cut_by_a_pipe_read_waits_for_its_rest() -> None:
    wire = pack_record(CID, CommandStarted(6, 5, ("ls", "-l"), 100, CaptureMode.NETLINK))
    wire += pack_control(REC_ACK, OTHER) + pack_control(REC_LOST)
    decoded, used = unpack_records(wire[:-3])
    assert used == len(wire) - 100 and [k for k, _, _ in decoded] == [1, REC_ACK]
    assert decoded[1] == (REC_ACK, OTHER, None)
    rest, used = unpack_records(wire[used:])
    assert used == 100 and [(k, rec) for k, _, rec in rest] == [(REC_LOST, None)]


# -- the process table ---------------------------------------------------------------------


def test_a_process_forked_inside_the_container_is_followed_without_reading_its_cgroup() -> None:
    proc = FakeProc()
    proc.cmdlines[101] = ("/bin/echo", "hi")
    table = ProcessTable(proc)
    table.watch(CID, [100])
    assert table.feed(fork(100, 101)) == []
    out = table.feed(exec_(101, ts=50))
    assert out == [(CID, CommandStarted(101, 100, ("/bin/echo", "hi"), 50, CaptureMode.NETLINK))]
    assert ("cgroup", 101) not in proc.reads


def test_a_docker_exec_is_placed_by_its_cgroup() -> None:
    proc = FakeProc()
    proc.cgroups[200] = cgroup_of(CID)
    proc.cmdlines[200] = ("sh", "-c", "exit 7")
    table = ProcessTable(proc)
    table.watch(CID)
    table.watch(OTHER)
    table.feed(fork(150, 200))
    [(cid, started)] = table.feed(exec_(200))
    assert cid == CID and isinstance(started, CommandStarted) and started.ppid == 150
    [(cid, finished), (_, empty)] = table.feed(exit_(200, 7 << 8, ts=9))
    assert isinstance(finished, CommandFinished) and finished.exit == 7
    assert finished.argv == ("sh", "-c", "exit 7") and isinstance(empty, ContainerEmpty)


def test_host_processes_are_ignored_and_not_read_when_nothing_is_watched() -> None:
    proc = FakeProc()
    proc.cgroups[300] = "4:memory:/\n"
    table = ProcessTable(proc)
    assert table.feed(exec_(300)) == []
    assert proc.reads == []
    table.watch(CID)
    assert table.feed(exec_(300)) == []
    assert proc.reads == [("cgroup", 300)]


def test_a_process_gone_before_its_cgroup_is_read_is_placed_by_its_ancestors() -> None:
    proc = FakeProc()  # knows nothing of 151: it has exited and been reaped
    table = ProcessTable(proc)
    table.feed(fork(100, 150))  # seen before the container was watched
    table.feed(fork(150, 151))
    table.watch(CID, [100])
    [(cid, started)] = table.feed(exec_(151))
    assert cid == CID and isinstance(started, CommandStarted)
    assert started.argv == () and started.ppid == 150


def test_an_exec_over_an_exec_ends_the_first_command_without_a_status() -> None:
    proc = FakeProc()
    table = ProcessTable(proc)
    table.watch(CID, [100])
    table.feed(fork(100, 101))
    proc.cmdlines[101] = ("sh", "-c", "exec true")
    table.feed(exec_(101, ts=10))
    proc.cmdlines[101] = ("true",)
    out = [rec for _, rec in table.feed(exec_(101, ts=20))]
    assert out == [
        CommandFinished(101, 100, ("sh", "-c", "exec true"), 10, 20, None, CaptureMode.NETLINK),
        CommandStarted(101, 100, ("true",), 20, CaptureMode.NETLINK),
    ]


def test_threads_are_not_processes_and_a_killed_command_reports_its_signal() -> None:
    proc = FakeProc()
    proc.cmdlines[101] = ("python3",)
    table = ProcessTable(proc)
    table.watch(CID, [100])
    table.feed(fork(100, 101))
    table.feed(exec_(101, ts=1_000_000))
    table.feed(fork(100, 102, thread_of=101))  # a thread of 101
    assert table.feed(exit_(102, tgid=101)) == []  # the thread ends: nothing to report
    [(_, finished)] = table.feed(exit_(101, status=9, ts=5_000_000))
    assert isinstance(finished, CommandFinished)
    assert finished.exit == -9 and finished.duration_ms == 4


def test_the_last_exit_says_the_container_is_empty() -> None:
    table = ProcessTable(FakeProc())
    table.watch(CID, [100, 101])
    assert table.feed(exit_(101)) == []
    assert table.feed(exit_(100, ts=7)) == [(CID, ContainerEmpty(7))]


def test_unwatching_forgets_the_containers_processes() -> None:
    proc = FakeProc()
    proc.cmdlines[101] = ("ls",)
    table = ProcessTable(proc)
    table.watch(CID, [100])
    table.unwatch(CID)
    table.feed(fork(100, 101))
    assert table.feed(exec_(101)) == []


def test_a_zombie_is_named_by_its_comm_and_a_reaped_process_by_nothing(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "cmdline").write_bytes(b"")
    (tmp_path / "7" / "comm").write_bytes(b"echo\n")
    (tmp_path / "7" / "stat").write_bytes(b"7 (echo) Z 5 7 7 0 -1")
    (tmp_path / "8").mkdir()
    (tmp_path / "8" / "cmdline").write_bytes(b"ls\0-l\0")
    reader = SysProcReader(str(tmp_path))
    assert reader.cmdline(7) == ("echo",)
    assert reader.ppid(7) == 5
    assert reader.cmdline(8) == ("ls", "-l")
    assert reader.cmdline(9) is None and reader.cgroup(9) is None


# -- the polling fallback -----------------------------------------------------------------


def test_polling_reports_new_changed_and_vanished_processes() -> None:
    proc = FakeProc()
    proc.cmdlines.update({1: ("/sbin/docker-init", "--", "sh"), 7: ("sh",), 8: ("make",)})
    proc.ppids.update({7: 1, 8: 7})
    poll = PollTracker(proc)
    first = poll.step([1, 7, 8], 100)
    assert [r.argv for r in first if isinstance(r, CommandStarted)] == [
        ("/sbin/docker-init", "--", "sh"), ("sh",), ("make",),
    ]  # fmt: skip
    assert all(r.mode is CaptureMode.POLL for r in first if isinstance(r, CommandStarted))
    proc.cmdlines[8] = ("cc", "x.c")  # make executed the compiler
    second = poll.step([1, 7, 8], 200)
    assert second == [
        CommandFinished(8, 7, ("make",), 100, 200, None, CaptureMode.POLL),
        CommandStarted(8, 7, ("cc", "x.c"), 200, CaptureMode.POLL),
    ]
    third = poll.step([], 300)
    assert [r.pid for r in third if isinstance(r, CommandFinished)] == [1, 7, 8]
    assert third[-1] == ContainerEmpty(300)


def test_polling_skips_subshells_and_the_engines_own_process() -> None:
    proc = FakeProc()
    proc.cmdlines.update({7: ("sh", "-c", "x"), 9: ("sh", "-c", "x"), 3: ("runc", "init")})
    proc.ppids.update({9: 7})
    poll = PollTracker(proc)
    out = poll.step([3, 7], 100)
    assert [r.pid for r in out] == [7]
    assert poll.step([3, 7, 9], 200) == []  # 9 is a fork of 7 that executed nothing yet
    proc.cmdlines[9] = ("grep", "y")
    assert poll.step([7, 9], 300) == [CommandStarted(9, 7, ("grep", "y"), 300, CaptureMode.POLL)]


# A reader that answers each watch with two records of the container, then the ack.
FAKE_READER = fake_reader(("a",), 10, 20)


def test_a_batch_subscriber_gets_a_reads_records_in_one_call_before_the_ack() -> None:
    from sandbox.proc_hub import NetlinkProcHub

    hub = NetlinkProcHub(FAKE_READER)
    batches: list[list[Record]] = []
    singles: list[Record] = []
    hub.subscribe(CID, [], batches.append, batch=True)
    try:
        hub.subscribe(OTHER, [], singles.append)
        try:
            # (subscribe returned on the ack: what came before it was delivered)
            started = CommandStarted(5, 1, ("a",), 10, CaptureMode.NETLINK)
            finished = CommandFinished(5, 1, ("a",), 10, 20, 0, CaptureMode.NETLINK)
            assert batches == [[started, finished]]
            assert singles == batches[0]
        finally:
            hub.unsubscribe(OTHER)
    finally:
        hub.unsubscribe(CID)


def test_the_reader_lingers_after_the_last_subscriber_and_is_reused() -> None:
    from sandbox.proc_hub import NetlinkProcHub

    hub = NetlinkProcHub(FAKE_READER, linger_s=3600)
    hub.subscribe(CID, [], lambda rec: None)
    reader = hub._proc
    assert reader is not None
    hub.unsubscribe(CID)
    assert hub._proc is reader and reader.poll() is None  # nobody subscribed, still there
    hub.subscribe(OTHER, [], lambda rec: None)
    assert hub._proc is reader  # reused: no new reader started
    hub.unsubscribe(OTHER)
    hub._stop_if_idle()  # what the linger timer does once it ran out
    assert hub._proc is None and reader.poll() is not None


def test_with_no_linger_the_reader_ends_with_its_last_subscriber() -> None:
    from sandbox.proc_hub import NetlinkProcHub

    hub = NetlinkProcHub(FAKE_READER, linger_s=0)
    hub.subscribe(CID, [], lambda rec: None)
    reader = hub._proc
    hub.unsubscribe(CID)
    assert hub._proc is None and reader is not None and reader.poll() is not None
