"""The shared capture loop: jobs run on one thread, on a grid; poked, removed."""

from __future__ import annotations

import threading
from collections.abc import Collection, Sequence

from sandbox.capture_loop import CaptureLoop

DEADLINE_S = 10.0


class Job:
    """Asks for a tick when poked (like a capture with records waiting)."""

    def __init__(self, loop: CaptureLoop) -> None:
        self.loop = loop
        self.pending = False
        self.flush_at: int | None = None
        self.ticks: list[int] = []
        self.threads: set[int] = set()
        self.delivered = threading.Event()

    def put(self) -> None:
        self.pending = True
        self.loop.poke()

    def tick(self, now_ns: int, ready: Collection[int]) -> int | None:
        self.ticks.append(now_ns)
        self.threads.add(threading.get_ident())
        if self.pending and self.flush_at is None:
            self.flush_at = self.loop.grid(now_ns)  # deliver at the tick
        if self.flush_at is not None and now_ns >= self.flush_at:
            self.pending, self.flush_at = False, None
            self.delivered.set()
        return self.flush_at

    def wait_fds(self) -> Sequence[int]:
        return ()


def test_a_poked_job_is_run_on_the_loops_one_thread_at_a_tick() -> None:
    loop = CaptureLoop(tick_s=0.02)
    a, b = Job(loop), Job(loop)
    loop.add(a)
    loop.add(b)
    try:
        a.put()
        b.put()
        assert a.delivered.wait(DEADLINE_S) and b.delivered.wait(DEADLINE_S)
        assert a.threads == b.threads and len(a.threads) == 1
        assert threading.get_ident() not in a.threads
    finally:
        loop.remove(a)
        loop.remove(b)


def test_a_removed_job_is_not_run_again_and_the_thread_ends_after_the_last() -> None:
    loop = CaptureLoop(tick_s=0.02, linger_s=2.0)
    a, b = Job(loop), Job(loop)
    loop.add(a)
    loop.add(b)
    loop.remove(a)
    seen = len(a.ticks)
    b.put()
    assert b.delivered.wait(DEADLINE_S)
    assert len(a.ticks) == seen
    loop.remove(b)
    thread = loop._thread
    assert thread is not None and thread.is_alive()  # it lingers for the next job
    c = Job(loop)
    loop.add(c)  # ... which it runs on the same thread
    c.put()
    assert c.delivered.wait(DEADLINE_S) and loop._thread is thread
    loop.remove(c)
    thread.join(DEADLINE_S)  # and ends once nothing came for `linger_s`
    assert not thread.is_alive() and loop._thread is None


def test_a_job_may_remove_another_from_its_own_tick() -> None:
    loop = CaptureLoop(tick_s=0.02)
    victim = Job(loop)

    class Remover(Job):
        def tick(self, now_ns: int, ready: Collection[int]) -> int | None:
            loop.remove(victim)  # (a sink that stops another capture)
            return super().tick(now_ns, ready)

    remover = Remover(loop)
    loop.add(remover)
    loop.add(victim)
    try:
        remover.put()
        assert remover.delivered.wait(DEADLINE_S)
        seen = len(victim.ticks)
        remover.delivered.clear()
        remover.put()
        assert remover.delivered.wait(DEADLINE_S)
        assert len(victim.ticks) == seen
    finally:
        loop.remove(remover)
