"""The reaper removes dead attempts' containers and workspaces, and keeps live ones."""

from __future__ import annotations

import socket
import subprocess

from sandbox.container_spec import LABEL_BATCH, LABEL_OWNER
from sandbox.liveness import Owner, current_owner, owner_is_live
from sandbox.reaper import reap
from sandbox.workspace import prepare_workspace


def dead_owner() -> str:
    done = subprocess.Popen(["true"])
    done.wait()
    return Owner(socket.gethostname(), done.pid, start_ticks=1).token()


def orphan_workspace(data_dir, batch, task, owner):
    return prepare_workspace(data_dir, batch=batch, task=task, attempt=1, owner=owner,
                             size_bytes=8 * 2**20)  # fmt: skip


def test_this_process_is_live_and_a_finished_one_is_not():
    assert owner_is_live(current_owner().token())
    assert not owner_is_live(dead_owner())


def test_a_reused_pid_with_another_start_time_is_not_live():
    me = current_owner()
    assert not owner_is_live(Owner(me.host, me.pid, me.start_ticks + 1).token())


def test_owners_on_other_hosts_are_never_judged_dead():
    assert owner_is_live("some-other-host.invalid:1:1")


def test_a_malformed_or_missing_owner_is_not_live():
    assert not owner_is_live(None)
    assert not owner_is_live("garbage")


def test_reaper_removes_an_orphaned_container_and_workspace_and_keeps_live_ones(
    rig, minimal, data_dir, batch_id, host_workspace
):
    dead, live = dead_owner(), current_owner().token()
    orphan = rig.backend.create(
        rig.spec(minimal, batch_id, ["sleep", "60"], host_workspace, **{LABEL_OWNER: dead})
    )
    kept = rig.backend.create(
        rig.spec(minimal, batch_id, ["sleep", "60"], host_workspace, **{LABEL_OWNER: live})
    )
    try:
        rig.backend.start(orphan)
        dead_ws = orphan_workspace(data_dir, batch_id, "dead", dead)
        live_ws = orphan_workspace(data_dir, batch_id, "live", live)

        report = reap(rig.backend, data_dir, labels={LABEL_BATCH: batch_id})

        assert [b.id for b in rig.backend.list({LABEL_BATCH: batch_id})] == [kept]
        assert len(report.containers_removed) == 1
        assert report.workspaces_removed == (str(dead_ws.root),)
        assert not dead_ws.root.exists()
        assert live_ws.root.exists()
        assert report.kept == 2
        assert report.failures == ()
    finally:
        rig.backend.remove(kept)
        rig.backend.remove(orphan)
        reap(rig.backend, data_dir, is_live=lambda owner: False, labels={LABEL_BATCH: batch_id})
    assert not (data_dir / "workspaces" / batch_id).exists()
