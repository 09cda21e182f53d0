"""Workspaces on the host: clone at a ref, copy a directory, collect a safe, binary-safe diff."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from accounting.errors import WorkspaceError
from sandbox.workspace import (
    EMPTY_TREE,
    collect_diff,
    prepare_workspace,
    read_owner,
    remove_workspace,
)

ROOT = os.geteuid() == 0


def git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}  # fmt: skip
    done = subprocess.run(["git", "-C", str(repo), *args], env=env, check=True,
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip()


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A repository with two commits on main and a tag v1 at the first."""
    repo = tmp_path / "src"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "a.txt").write_text("one\n")
    (repo / "gone.txt").write_text("delete me\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "tag", "v1")
    (repo / "a.txt").write_text("one\ntwo\n")
    git(repo, "commit", "-qam", "second")
    return repo


def prepare(data_dir: Path, **kwargs):
    defaults = dict(batch="b", task="t", attempt=1, owner="h:1:1", size_bytes=64 * 2**20)
    return prepare_workspace(data_dir, **(defaults | kwargs))


def test_repo_is_checked_out_at_the_ref(data_dir, source_repo):
    ws = prepare(data_dir, repo=str(source_repo), ref="v1")
    try:
        assert (ws.path / "a.txt").read_text() == "one\n"
        assert ws.base_commit == git(source_repo, "rev-parse", "v1")
        assert ws.path == data_dir / "workspaces" / "b" / "t" / "1" / "repo"
        assert read_owner(ws.root) == "h:1:1"
    finally:
        remove_workspace(ws.root)


def test_the_checkout_names_its_origin_and_the_agent_as_committer(data_dir, source_repo):
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        config = ["config", "--file", str(ws.path / ".git" / "config"), "--get-all"]
        assert git(ws.path, *config, "remote.origin.url") == str(source_repo.resolve())
        assert git(ws.path, *config, "user.name") == "sandfleet agent"
        assert git(ws.path, *config, "user.email") == "agent@sandfleet.invalid"
    finally:
        remove_workspace(ws.root)


def test_default_ref_is_the_repos_head(data_dir, source_repo):
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        assert (ws.path / "a.txt").read_text() == "one\ntwo\n"
    finally:
        remove_workspace(ws.root)


@pytest.mark.skipif(not ROOT, reason="chown to uid 10001 needs root")
def test_workspace_belongs_to_the_sandbox_user(data_dir, source_repo):
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        owners = {p.lstat().st_uid for p in [ws.path, *ws.path.rglob("*")]}
        assert owners == {10001}
    finally:
        remove_workspace(ws.root)


def test_a_bad_repo_is_a_workspace_error_and_leaves_nothing(data_dir, tmp_path):
    with pytest.raises(WorkspaceError, match="cannot clone"):
        prepare(data_dir, repo=str(tmp_path / "no-such-repo"))
    assert not (data_dir / "workspaces" / "b" / "t" / "1").exists()


def test_a_bad_ref_is_a_workspace_error_naming_the_fix(data_dir, source_repo):
    with pytest.raises(WorkspaceError, match=r"ref 'nope' not found.*--ref"):
        prepare(data_dir, repo=str(source_repo), ref="nope")
    assert not (data_dir / "workspaces" / "b" / "t" / "1").exists()


def test_an_unsafe_task_id_cannot_escape_the_data_dir(data_dir, source_repo):
    with pytest.raises(WorkspaceError, match="task id"):
        prepare(data_dir, task="../../etc", repo=str(source_repo))


def test_diff_has_edits_deletions_new_text_and_binary_files(data_dir, source_repo):
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        (ws.path / "a.txt").write_text("one\nTWO\nthree\n")
        (ws.path / "gone.txt").unlink()
        (ws.path / "new").mkdir()
        (ws.path / "new" / "b.txt").write_text("fresh\n")
        (ws.path / "blob.bin").write_bytes(bytes(range(256)) * 4)
        diff = collect_diff(ws, data_dir / "out" / "diff.patch")
        patch = diff.patch_path.read_bytes()
        assert b"+TWO" in patch and b"+three" in patch and b"-two" in patch
        assert b"deleted file mode" in patch
        assert b"new file mode" in patch and b"+fresh" in patch
        assert b"GIT binary patch" in patch
        assert diff.files_changed == 4
        assert (diff.insertions, diff.deletions) == (3, 2)
        assert diff.sha256 == hashlib.sha256(patch).hexdigest()
        assert diff.size_bytes == len(patch)
    finally:
        remove_workspace(ws.root)


def test_diff_applies_cleanly_to_the_base(data_dir, source_repo, tmp_path):
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        (ws.path / "a.txt").write_text("changed\n")
        (ws.path / "c.bin").write_bytes(b"\x00\x01\x02")
        diff = collect_diff(ws, data_dir / "diff.patch")
    finally:
        remove_workspace(ws.root)
    check = tmp_path / "check"
    subprocess.run(["git", "clone", "-q", str(source_repo), str(check)], check=True)
    git(check, "apply", "--index", str(diff.patch_path))
    assert (check / "a.txt").read_text() == "changed\n"
    assert (check / "c.bin").read_bytes() == b"\x00\x01\x02"


def test_agent_git_config_cannot_run_commands_on_the_host(data_dir, source_repo, tmp_path):
    marker = tmp_path / "pwned"
    evil = f"touch {marker}"
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        with (ws.path / ".git" / "config").open("a") as f:
            f.write(f"[core]\n\tfsmonitor = {evil}\n\tpager = {evil}\n"
                    f"[diff]\n\texternal = {evil}\n"
                    f"[filter \"x\"]\n\tclean = {evil}\n\tsmudge = {evil}\n")  # fmt: skip
        (ws.path / ".gitattributes").write_text("* filter=x diff=x\n")
        hooks = ws.path / ".git" / "hooks"
        hooks.mkdir(exist_ok=True)
        for hook in ("pre-commit", "post-index-change", "fsmonitor-watchman"):
            (hooks / hook).write_text(f"#!/bin/sh\n{evil}\n")
            (hooks / hook).chmod(0o755)
        (ws.path / "a.txt").write_text("edited\n")
        diff = collect_diff(ws, data_dir / "diff.patch")
        assert diff.files_changed == 2  # a.txt and .gitattributes
    finally:
        remove_workspace(ws.root)
    assert not marker.exists()


def test_copied_directory_becomes_the_base_and_new_files_show(data_dir, tmp_path):
    src = tmp_path / "given"
    src.mkdir()
    (src / "keep.txt").write_text("k\n")
    ws = prepare(data_dir, copy_from=src)
    try:
        assert (ws.path / "keep.txt").read_text() == "k\n"
        (ws.path / "added.txt").write_text("a\n")
        diff = collect_diff(ws, data_dir / "diff.patch")
        assert diff.files_changed == 1
        assert b"+a" in diff.patch_path.read_bytes()
    finally:
        remove_workspace(ws.root)


def test_no_source_gives_an_empty_workspace(data_dir):
    ws = prepare(data_dir)
    try:
        assert list(ws.path.iterdir()) == []
        (ws.path / "x").write_text("x\n")
        assert collect_diff(ws, data_dir / "diff.patch").files_changed == 1
    finally:
        remove_workspace(ws.root)


def test_an_empty_workspace_left_empty_has_an_empty_diff_and_no_repository(data_dir, tmp_path):
    given = tmp_path / "nothing"
    given.mkdir()
    for kwargs in ({}, {"copy_from": given}):
        ws = prepare(data_dir, **kwargs)
        try:
            assert ws.base_commit == EMPTY_TREE and not ws.git_dir.exists()
            diff = collect_diff(ws, data_dir / "diff.patch")
            assert diff.patch_path.read_bytes() == b""
            assert (diff.size_bytes, diff.files_changed, diff.insertions) == (0, 0, 0)
            assert diff.sha256 == hashlib.sha256(b"").hexdigest()
            assert not ws.git_dir.exists()
        finally:
            remove_workspace(ws.root)


def test_files_added_to_an_empty_workspace_are_a_patch_that_applies(data_dir, tmp_path):
    ws = prepare(data_dir)
    try:
        (ws.path / "dir").mkdir()
        (ws.path / "dir" / "new.txt").write_text("one\ntwo\n")
        (ws.path / "c.bin").write_bytes(b"\x00\x01\x02")
        (ws.path / "empty-dir").mkdir()
        diff = collect_diff(ws, data_dir / "diff.patch")
    finally:
        remove_workspace(ws.root)
    assert (diff.files_changed, diff.insertions, diff.deletions) == (2, 2, 0)
    check = tmp_path / "check"
    check.mkdir()
    git(check, "init", "-q")
    git(check, "apply", "--index", str(diff.patch_path))
    assert (check / "dir" / "new.txt").read_text() == "one\ntwo\n"
    assert (check / "c.bin").read_bytes() == b"\x00\x01\x02"


@pytest.mark.skipif(not ROOT, reason="mounting a tmpfs needs root")
def test_workspace_is_a_size_capped_tmpfs_when_root(data_dir):
    ws = prepare(data_dir, size_bytes=2 * 2**20)
    try:
        assert ws.size_capped and os.path.ismount(ws.path)
        with pytest.raises(OSError, match="No space left"):
            (ws.path / "big").write_bytes(b"\0" * (3 * 2**20))
    finally:
        remove_workspace(ws.root)
    assert not ws.root.exists()


def test_without_tmpfs_the_workspace_is_a_plain_directory_and_says_so(data_dir):
    ws = prepare(data_dir, use_tmpfs=False)
    try:
        assert not ws.size_capped and not os.path.ismount(ws.path)
        assert any("not capped" in note for note in ws.notes)
    finally:
        remove_workspace(ws.root)


def test_an_existing_workspace_is_not_reused(data_dir):
    ws = prepare(data_dir)
    try:
        with pytest.raises(WorkspaceError, match="already exists"):
            prepare(data_dir)
    finally:
        remove_workspace(ws.root)


def test_as_non_root_the_workspace_is_world_writable_and_says_so(
    data_dir, source_repo, monkeypatch
):
    import sandbox.workspace as workspace_module

    monkeypatch.setattr(workspace_module.os, "geteuid", lambda: 1000)
    ws = prepare(data_dir, repo=str(source_repo))
    try:
        assert not ws.size_capped
        assert ws.path.stat().st_mode & 0o777 == 0o777
        assert (ws.path / "a.txt").stat().st_mode & 0o666 == 0o666
        assert any("world-writable" in note for note in ws.notes)
    finally:
        remove_workspace(ws.root)


def test_a_plain_directory_as_repo_is_snapshotted_like_a_workspace(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    src.mkdir()
    (src / "hello.txt").write_text("hi\n")
    ws = prepare_workspace(
        tmp_path / "data", batch="b", task="t", attempt=1, owner="o",
        size_bytes=1 << 20, repo=str(src), use_tmpfs=False,
    )  # fmt: skip
    try:
        assert (ws.path / "hello.txt").read_text() == "hi\n"
        assert ws.source == str(src.resolve())
    finally:
        remove_workspace(ws.root)


def test_a_ref_on_a_plain_directory_is_refused_with_the_fix(tmp_path: Path) -> None:
    src = tmp_path / "plain"
    src.mkdir()
    with pytest.raises(WorkspaceError, match=r"plain directory has no ref 'main'; fix"):
        prepare_workspace(
            tmp_path / "data", batch="b", task="t", attempt=1, owner="o",
            size_bytes=1 << 20, repo=str(src), ref="main", use_tmpfs=False,
        )  # fmt: skip
