"""File changes: inotify records, debouncing (pure), and a real inotify watcher on a
temporary directory (no container needed: the workspace is a host directory)."""

from __future__ import annotations

import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.debounce import Debouncer, RawChange
from sandbox.file_watch import FileChange, FileWatcher, WatchRoot
from sandbox.inotify import InotifyRecord, parse_events

MS = 1_000_000


def raw(ns: int, op: str, path: str, src: str | None = None) -> RawChange:
    return RawChange(ns, op, path, src)


# -- inotify records -------------------------------------------------------------------


def test_inotify_records_are_parsed_with_their_padded_names() -> None:
    name = b"a.txt\0\0\0\0\0\0\0\0\0\0\0"
    data = struct.pack("=iIII", 1, 0x100, 0, len(name)) + name
    data += struct.pack("=iIII", 2, 0x40, 77, 0)
    assert parse_events(data) == [
        InotifyRecord(1, 0x100, 0, "a.txt"),
        InotifyRecord(2, 0x40, 77, ""),
    ]


# -- debouncing -------------------------------------------------------------------------


def test_a_create_and_its_writes_are_one_create_once_the_path_is_quiet() -> None:
    d = Debouncer(quiet_ns=100 * MS, max_delay_ns=1000 * MS)
    assert d.add(raw(0, "create", "/w/a")) == []
    assert d.add(raw(50 * MS, "modify", "/w/a")) == []
    assert d.next_due_ns() == 150 * MS
    assert d.due(149 * MS) == []
    assert d.due(150 * MS) == [raw(0, "create", "/w/a")]
    assert len(d) == 0


def test_a_file_written_without_pause_is_still_reported_after_the_max_delay() -> None:
    d = Debouncer(quiet_ns=100 * MS, max_delay_ns=300 * MS)
    for t in range(0, 400, 50):
        d.add(raw(t * MS, "modify", "/w/log"))
        if t == 300:
            assert d.due(t * MS) == [raw(0, "modify", "/w/log")]
        else:
            assert d.due(t * MS) == []


def test_a_delete_comes_after_the_change_still_pending_for_its_path() -> None:
    d = Debouncer(quiet_ns=100 * MS, max_delay_ns=1000 * MS)
    d.add(raw(0, "create", "/w/tmp"))
    d.add(raw(1, "modify", "/w/other"))
    assert d.add(raw(10 * MS, "delete", "/w/tmp")) == [
        raw(0, "create", "/w/tmp"),
        raw(10 * MS, "delete", "/w/tmp"),
    ]
    assert d.drain() == [raw(1, "modify", "/w/other")]


def test_a_rename_flushes_both_of_its_paths_and_a_directory_what_is_under_it() -> None:
    d = Debouncer(quiet_ns=100 * MS, max_delay_ns=1000 * MS)
    d.add(raw(0, "create", "/w/d/x"))
    d.add(raw(1, "modify", "/w/e"))
    d.add(raw(2, "modify", "/w/dd"))  # not under /w/d/
    out = d.add(raw(5, "rename", "/w/e/", src="/w/d/"))
    assert out == [raw(0, "create", "/w/d/x"), raw(5, "rename", "/w/e/", src="/w/d/")]
    out = d.add(raw(6, "rename", "/w/f", src="/w/e"))
    assert out == [raw(1, "modify", "/w/e"), raw(6, "rename", "/w/f", src="/w/e")]
    assert d.drain() == [raw(2, "modify", "/w/dd")]


# -- the watcher on a real directory ----------------------------------------------------


class Collected:
    def __init__(self) -> None:
        self.changes: list[FileChange] = []
        self.cond = threading.Condition()

    def __call__(self, change: FileChange) -> None:
        with self.cond:
            self.changes.append(change)
            self.cond.notify_all()

    def wait_for(self, pred: Callable[[list[FileChange]], bool], timeout: float = 10.0) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: pred(self.changes), timeout):
                pytest.fail(f"not seen within {timeout}s; got {self.changes}")

    def ops(self) -> list[tuple[str, str, int, str | None]]:
        return [(c.op, c.path, c.bytes, c.src) for c in self.changes]


def has(*wanted: tuple[str, str]) -> Callable[[list[FileChange]], bool]:
    return lambda cs: all(any((c.op, c.path) == w for c in cs) for w in wanted)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, Collected, FileWatcher]]:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "existing.txt").write_text("seed\n")
    (ws / "doomed.txt").write_text("1234567")
    (ws / "sub").mkdir()
    got = Collected()
    watcher = FileWatcher([WatchRoot(str(ws), "/workspace")], got, quiet_s=0.05)
    watcher.start()
    try:
        yield ws, got, watcher
    finally:
        watcher.stop()


def test_creations_modifications_renames_and_deletions_are_reported_with_sizes(
    watched: tuple[Path, Collected, FileWatcher],
) -> None:
    ws, got, _ = watched
    (ws / "new.txt").write_text("hello")
    with (ws / "existing.txt").open("a") as f:
        f.write("more\n")
    got.wait_for(has(("create", "/workspace/new.txt"), ("modify", "/workspace/existing.txt")))
    os.rename(ws / "new.txt", ws / "sub" / "moved.txt")
    (ws / "doomed.txt").unlink()
    got.wait_for(has(("rename", "/workspace/sub/moved.txt"), ("delete", "/workspace/doomed.txt")))
    ops = got.ops()
    assert ("create", "/workspace/new.txt", 5, None) in ops
    assert ("modify", "/workspace/existing.txt", 10, None) in ops
    assert ("rename", "/workspace/sub/moved.txt", 5, "/workspace/new.txt") in ops
    assert ("delete", "/workspace/doomed.txt", 7, None) in ops  # the last size seen
    assert len(ops) == 4  # nothing else, and each change once


def test_a_burst_of_writes_is_one_change(watched: tuple[Path, Collected, FileWatcher]) -> None:
    ws, got, _ = watched
    with (ws / "log.txt").open("w") as f:
        for _ in range(200):
            f.write("x" * 10)
            f.flush()
    got.wait_for(has(("create", "/workspace/log.txt")))
    (ws / "marker").write_text("")  # a later change: the burst's report is complete by then
    got.wait_for(has(("create", "/workspace/marker")))
    assert [c for c in got.ops() if c[1] == "/workspace/log.txt"] == [
        ("create", "/workspace/log.txt", 2000, None)
    ]


def test_new_directories_are_watched_even_when_filled_before_the_watch_lands(
    watched: tuple[Path, Collected, FileWatcher],
) -> None:
    ws, got, _ = watched
    (ws / "a" / "b").mkdir(parents=True)
    (ws / "a" / "b" / "deep.txt").write_text("deep")
    got.wait_for(has(("create", "/workspace/a/b/deep.txt")))
    os.rename(ws / "a", ws / "A")
    got.wait_for(has(("rename", "/workspace/A/")))
    (ws / "A" / "b" / "later.txt").write_text("12")
    got.wait_for(has(("create", "/workspace/A/b/later.txt")))
    ops = got.ops()
    assert ("create", "/workspace/a/", 0, None) in ops
    assert ("create", "/workspace/a/b/deep.txt", 4, None) in ops
    assert ("rename", "/workspace/A/", 0, "/workspace/a/") in ops
    assert ("create", "/workspace/A/b/later.txt", 2, None) in ops


def test_moving_out_is_a_delete_and_moving_in_a_create(
    watched: tuple[Path, Collected, FileWatcher], tmp_path: Path
) -> None:
    ws, got, _ = watched
    shutil.move(str(ws / "sub"), str(tmp_path / "away"))
    (tmp_path / "incoming.txt").write_text("abc")
    os.rename(tmp_path / "incoming.txt", ws / "incoming.txt")
    got.wait_for(has(("delete", "/workspace/sub/"), ("create", "/workspace/incoming.txt")))
    (tmp_path / "away" / "after.txt").write_text("not ours any more")
    (ws / "marker").write_text("")
    got.wait_for(has(("create", "/workspace/marker")))
    assert not any("after.txt" in c.path for c in got.changes)
    assert ("create", "/workspace/incoming.txt", 3, None) in got.ops()


def test_a_fresh_root_reports_what_it_already_holds_and_a_workspace_does_not(
    tmp_path: Path,
) -> None:
    ws, tmp = tmp_path / "ws", tmp_path / "tmpfs"
    ws.mkdir()
    tmp.mkdir()
    (ws / "cloned.py").write_text("print()")
    (tmp / "early.txt").write_text("written before the watch")
    got = Collected()
    watcher = FileWatcher([WatchRoot(str(ws), "/workspace")], got, quiet_s=0.05)
    watcher.start()
    try:
        watcher.add_root_later(WatchRoot(str(tmp), "/tmp", fresh=True))
        got.wait_for(has(("create", "/tmp/early.txt")))
        (tmp / "late.txt").write_text("x")
        got.wait_for(has(("create", "/tmp/late.txt")))
    finally:
        watcher.stop()
    assert not any(c.path.startswith("/workspace") for c in got.changes)


def test_pending_changes_are_reported_at_stop(tmp_path: Path) -> None:
    got = Collected()
    watcher = FileWatcher([WatchRoot(str(tmp_path), "/workspace")], got, quiet_s=60)
    watcher.start()
    (tmp_path / "f").write_text("abc")
    deadline = time.monotonic() + 10
    while len(watcher.debouncer) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the watcher thread picks the write up; nothing is due for 60 s
    watcher.stop()
    assert got.ops() == [("create", "/workspace/f", 3, None)]


def test_a_directory_swapped_for_a_link_to_the_host_is_not_followed(tmp_path: Path) -> None:
    host = tmp_path / "host-secrets"
    host.mkdir()
    (host / "id_rsa").write_text("PRIVATE KEY")
    ws = tmp_path / "ws"
    ws.mkdir()
    got = Collected()
    watcher = FileWatcher([WatchRoot(str(ws), "/workspace")], got, quiet_s=0.05)
    try:
        (ws / "d").symlink_to(host)  # what a sandbox would do after creating a real "d"
        watcher._watch_tree(0, "d", report=True)  # the watch the create of "d" asks for
        watcher.start()
        (ws / "marker").write_text("")
        got.wait_for(has(("create", "/workspace/marker")))
        assert watcher._size_of("/workspace/marker") == 0
        assert watcher._size_of("/workspace/d/id_rsa") == 0  # not the host file's 11 bytes
    finally:
        watcher.stop()
    assert not any("id_rsa" in c.path for c in got.changes)
