"""Helpers shared by the tests (importable as `helpers`: pytest's pythonpath holds tests/)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_engine(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where every engine must be present."""
    if CI:
        pytest.fail(f"{reason} (CI=true: engines are required; run `make setup`)")
    pytest.skip(reason)


def require_image(docker_client: Any, recipe: str) -> str:
    """The content-hashed tag of a recipe's image, or skip (fail under CI) when not built."""
    from docker.errors import ImageNotFound

    from sandbox.images import image_ref

    ref = image_ref(recipe)
    try:
        docker_client.images.get(ref)
    except ImageNotFound:
        missing_engine(f"image {ref} is not built (run `sandfleet images build`)")
    return ref


@contextmanager
def hardened_containers(
    docker_client: Any, label: str, **options: Any
) -> Iterator[Callable[[list[str]], Any]]:
    """`create(command)`: a hardened container of the base image (not started), as the
    sandboxes run (uid 10001, no network, read-only, no capabilities), labelled
    `sandfleet.test=<label>`, with `options` added; all removed on leaving."""
    ref = require_image(docker_client, "base")
    made: list[Any] = []

    def create(command: list[str]) -> Any:
        c = docker_client.containers.create(
            ref, command, user="10001:10001", network_mode="none", read_only=True,
            cap_drop=["ALL"], security_opt=["no-new-privileges:true"], init=True,
            nano_cpus=10**9, pids_limit=128, labels={"sandfleet.test": label}, **options,
        )  # fmt: skip
        made.append(c)
        return c

    try:
        yield create
    finally:
        for c in made:
            c.remove(force=True)


def fake_reader(argv: tuple[str, ...], start_ns: int, end_ns: int) -> list[str]:
    """The command line of a stand-in command reader (for `NetlinkProcHub`): it answers
    each watch with the start and end (exit 0) of one command `argv` of that container,
    then the ack."""
    script = f"""
import sys
from sandbox.proc_table import (REC_ACK, CaptureMode, CommandFinished, CommandStarted,
                                pack_control, pack_record)
out = sys.stdout.buffer
out.write(b'{{"t":"ready","realtime":false,"reader":"fake"}}\\n')
out.flush()
for line in sys.stdin:
    verb, cid = line.split()[:2]
    data = b""
    if verb == "watch":
        argv, mode = {argv!r}, CaptureMode.NETLINK
        data = (pack_record(cid, CommandStarted(5, 1, argv, {start_ns}, mode))
                + pack_record(cid, CommandFinished(5, 1, argv, {start_ns}, {end_ns}, 0, mode)))
    out.write(data + pack_control(REC_ACK, cid))
    out.flush()
"""
    return [sys.executable, "-c", script]


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
