"""FakeBackend specifics: virtual time, scripted outcomes, Docker-like states."""

from __future__ import annotations

import threading

import pytest

from accounting.errors import SandboxError
from sandbox.backend import SandboxStatus
from sandbox.fake_backend import FakeRun


def test_sleeps_take_no_real_time(fake_rig, minimal, batch_id, host_workspace):
    spec = fake_rig.spec(minimal, batch_id, ["sh", "-c", "sleep 3600; echo done"], host_workspace)
    box = fake_rig.backend.create(spec)
    fake_rig.backend.start(box)
    waited = fake_rig.backend.wait(box)  # an hour of virtual time, spent at once
    assert waited.duration_s == 3600
    assert b"".join(fake_rig.backend.logs(box, "stdout")) == b"done\n"


def test_the_oom_command_reports_oom_apart_from_the_exit_code(
    fake_rig, minimal, batch_id, host_workspace
):
    box = fake_rig.backend.create(
        fake_rig.spec(minimal, batch_id, ["sandfleet-fake-oom"], host_workspace)
    )
    fake_rig.backend.start(box)
    waited = fake_rig.backend.wait(box)
    assert (waited.exit_code, waited.oom, waited.timed_out) == (137, True, False)


def test_unknown_commands_are_not_found(fake_rig, minimal, batch_id, host_workspace):
    box = fake_rig.backend.create(fake_rig.spec(minimal, batch_id, ["frobnicate"], host_workspace))
    fake_rig.backend.start(box)
    assert fake_rig.backend.wait(box).exit_code == 127


def test_a_scripted_outcome_replaces_the_shell(make_fake_rig, minimal, batch_id, host_workspace):
    rig = make_fake_rig(run=lambda spec: FakeRun(stdout=b"x", exit_code=9))
    box = rig.backend.create(rig.spec(minimal, batch_id, ["anything"], host_workspace))
    rig.backend.start(box)
    assert rig.backend.wait(box).exit_code == 9
    assert b"".join(rig.backend.logs(box, "stdout")) == b"x"


def test_following_logs_blocks_until_the_sandbox_exits(fake_rig, minimal, batch_id, host_workspace):
    box = fake_rig.backend.create(fake_rig.spec(minimal, batch_id, ["echo", "hi"], host_workspace))
    fake_rig.backend.start(box)
    got: list[bytes] = []
    follower = threading.Thread(
        target=lambda: got.extend(fake_rig.backend.logs(box, "stdout", follow=True))
    )
    follower.start()
    assert fake_rig.backend.list({})[0].status is SandboxStatus.RUNNING
    fake_rig.backend.wait(box)
    follower.join(timeout=30)
    assert not follower.is_alive()
    assert got == [b"hi\n"]


def test_exec_needs_a_running_sandbox(fake_rig, minimal, batch_id, host_workspace):
    box = fake_rig.backend.create(fake_rig.spec(minimal, batch_id, ["true"], host_workspace))
    with pytest.raises(SandboxError, match="not running"):
        fake_rig.backend.exec(box, ["true"])


def test_paths_cannot_climb_out_of_the_workspace(fake_rig, minimal, batch_id, host_workspace):
    spec = fake_rig.spec(minimal, batch_id, ["sh", "-c", "echo x > ../escape"], host_workspace)
    box = fake_rig.backend.create(spec)
    fake_rig.backend.start(box)
    assert fake_rig.backend.wait(box).exit_code == 2
    assert not (host_workspace.parent / "escape").exists()
