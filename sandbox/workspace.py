"""The task's workspace: a repository checked out on the host, mounted at /workspace.

Layout of one attempt, `DATA/workspaces/<batch>/<task>/<attempt>/`::

    owner.json   who runs the attempt (the reaper's liveness record), written first
    base.git     a trusted bare copy of the repository at its base commit; never mounted
    repo/        the checkout the sandbox sees as /workspace (uid 10001); a tmpfs of the
                 template's workspace size when we are root, else a plain directory

The diff is computed on the host against `base.git` with an isolated git configuration
(no system or user config, no hooks, no fsmonitor, no external diff or textconv), so
nothing the agent writes into `repo/` (its own `.git/config`, `.gitattributes`, hooks)
can make the host run a command. New (untracked) files are included; `.gitignore`d ones
are not. The patch is binary-safe (`git diff --binary`).

A workspace that starts empty (no source, or an empty folder copied) has git's empty
tree as its base and no `base.git` until a diff needs one: when it is still empty at the
end, the diff is empty without running git at all.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from accounting.errors import WorkspaceError
from sandbox.container_spec import AGENT_UID

__all__ = [
    "EMPTY_TREE",
    "DiffSummary",
    "Workspace",
    "collect_diff",
    "prepare_workspace",
    "read_owner",
    "remove_workspace",
    "workspace_root",
]

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_GIT_TIMEOUT_S = 600
_BASE_AUTHOR = {
    "GIT_AUTHOR_NAME": "sandfleet",
    "GIT_AUTHOR_EMAIL": "sandfleet@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_NAME": "sandfleet",
    "GIT_COMMITTER_EMAIL": "sandfleet@localhost",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}
_SAFE_GIT = [
    "-c", "core.fsmonitor=false", "-c", "core.hooksPath=/dev/null", "-c", "core.symlinks=true",
]  # fmt: skip
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's empty tree (SHA-1 repositories)
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_MS_NOSUID, _MS_NODEV = 0x2, 0x4


@dataclass(frozen=True)
class Workspace:
    """One attempt's workspace on the host."""

    root: Path
    path: Path
    git_dir: Path  # made only when needed, for a workspace that started empty
    base_commit: str  # EMPTY_TREE for a workspace that started empty
    source: str
    ref: str | None
    size_capped: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class DiffSummary:
    """The collected change: where the patch is, its size, stats and sha256."""

    patch_path: Path
    size_bytes: int
    sha256: str
    files_changed: int
    insertions: int
    deletions: int


def _component(value: str | int, what: str) -> str:
    text = str(value)
    if not _SAFE.match(text):
        raise WorkspaceError(
            f"{what} {text!r} cannot name a directory; "
            "fix: use letters, digits, '_', '.' and '-' only (at most 128)"
        )
    return text


def workspace_root(data_dir: str | Path, batch: str, task: str, attempt: int) -> Path:
    """`DATA/workspaces/<batch>/<task>/<attempt>`."""
    return (
        Path(data_dir)
        / "workspaces"
        / _component(batch, "batch id")
        / _component(task, "task id")
        / _component(attempt, "attempt")
    )


def _run_git(
    args: list[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | object = subprocess.PIPE,
    what: str,
    fix: str,
) -> str:
    """Run git; on failure raise WorkspaceError with the command, its stderr and the fix."""
    argv = ["git", *args]
    try:
        done = subprocess.run(
            argv,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0", **(env or {})},
            cwd=cwd,
            stdout=stdout,  # type: ignore[arg-type]
            stderr=subprocess.PIPE,
            timeout=_GIT_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise WorkspaceError(
            f"{what}: `{' '.join(argv)}` took over {_GIT_TIMEOUT_S}s; fix: {fix}"
        ) from None
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()[-2000:]
        raise WorkspaceError(
            f"{what}: `{' '.join(argv)}` exited {done.returncode}: {stderr}; fix: {fix}"
        )
    return done.stdout.decode(errors="replace") if isinstance(done.stdout, bytes) else ""


def _isolated_env(ws_root: Path) -> dict[str, str]:
    """Git env for untrusted worktrees: no system/user config; only safe.directory=*."""
    config = ws_root / "host.gitconfig"
    if not config.exists():
        config.write_text("[safe]\n\tdirectory = *\n")
    return {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(config), "HOME": str(ws_root)}


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)  # this process's libc: mount(2), umount2(2)


def _mount_tmpfs(path: Path, size_bytes: int) -> None:
    """mount(2) a tmpfs of `size_bytes` on `path` (the syscall: no `mount` process)."""
    opts = f"size={size_bytes},mode=0755,uid={AGENT_UID},gid={AGENT_UID}"
    flags = _MS_NOSUID | _MS_NODEV
    if _libc().mount(b"sandfleet-workspace", os.fsencode(path), b"tmpfs", flags, opts.encode()):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount -t tmpfs on {path}: {os.strerror(errno)}")


def _umount(path: Path) -> str | None:
    """umount(2) `path`; the error's text, or None when it worked."""
    if _libc().umount2(os.fsencode(path), 0):
        return os.strerror(ctypes.get_errno())
    return None


def _hand_to_agent(path: Path) -> str | None:
    """Make `path` writable by the sandbox user; returns a note when only chmod was possible."""
    if os.geteuid() == 0:
        os.lchown(path, AGENT_UID, AGENT_UID)
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                os.lchown(os.path.join(dirpath, name), AGENT_UID, AGENT_UID)
        return None
    for dirpath, _dirnames, filenames in os.walk(path):
        os.chmod(dirpath, 0o777)  # noqa: S103 - the sandbox user must write here
        for name in filenames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, os.stat(full).st_mode | 0o666)  # noqa: S103
    return (
        "not root: the workspace is world-writable instead of owned by uid 10001, and files "
        "the sandbox creates may need root to delete"
    )


def prepare_workspace(
    data_dir: str | Path,
    *,
    batch: str,
    task: str,
    attempt: int,
    owner: str,
    size_bytes: int,
    repo: str | None = None,
    ref: str | None = None,
    copy_from: str | Path | None = None,
    use_tmpfs: bool | None = None,
) -> Workspace:
    """Check out `repo@ref`, or copy `copy_from`, or start empty, in a fresh workspace.

    `use_tmpfs=None` mounts a size-capped tmpfs when running as root. On error the
    half-made workspace is removed before the WorkspaceError is raised.
    """
    if repo is not None and copy_from is not None:
        raise WorkspaceError("give a repository (--repo) or a directory (--workspace), not both")
    root = workspace_root(data_dir, batch, task, attempt)
    if root.exists():
        raise WorkspaceError(
            f"workspace {root} already exists; fix: run `sandfleet sandbox reap` if its attempt "
            "is dead, or use a new attempt number"
        )
    root.mkdir(parents=True)
    (root / "owner.json").write_text(
        json.dumps({"owner": owner, "created": datetime.now(UTC).isoformat()}) + "\n"
    )
    try:
        return _fill(root, size_bytes, repo, ref, copy_from, use_tmpfs)
    except BaseException:
        remove_workspace(root)
        raise


def _fill(
    root: Path,
    size_bytes: int,
    repo: str | None,
    ref: str | None,
    copy_from: str | Path | None,
    use_tmpfs: bool | None,
) -> Workspace:
    path, git_dir = root / "repo", root / "base.git"
    path.mkdir()
    notes: list[str] = []
    capped = False
    if use_tmpfs is None:
        use_tmpfs = os.geteuid() == 0
    if use_tmpfs:
        try:
            _mount_tmpfs(path, size_bytes)
            capped = True
        except OSError as e:
            notes.append(f"no tmpfs for the workspace ({e}); its size is not capped")
    else:
        notes.append("no tmpfs (not root, or turned off): the workspace size is not capped")
    if repo is not None and _is_plain_dir(repo):
        if ref is not None:
            raise WorkspaceError(
                f"repo {repo}: a plain directory has no ref {ref!r}; fix: drop the ref, "
                "or make the directory a git repository (`git init && git commit`)"
            )
        repo, copy_from = None, repo
    if repo is not None:
        source = str(Path(repo).resolve()) if Path(repo).exists() else repo
        base = _checkout(source, ref, path, git_dir, _isolated_env(root))
    elif copy_from is not None:
        src = Path(copy_from)
        if not src.is_dir():
            raise WorkspaceError(f"--workspace {src}: not a directory; fix: give an existing one")
        source = str(src.resolve())
        shutil.copytree(src, path, symlinks=True, dirs_exist_ok=True)
        base = EMPTY_TREE if _is_empty(path) else _snapshot(path, git_dir, root)
    else:
        source = "(empty)"
        base = EMPTY_TREE
    note = _hand_to_agent(path)
    if note:
        notes.append(note)
    return Workspace(root, path, git_dir, base, source, ref, capped, tuple(notes))


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _is_plain_dir(repo: str) -> bool:
    """A local directory that is not a git repository (a work tree or a bare one)."""
    p = Path(repo)
    if "://" in repo or not p.is_dir():
        return False
    return not ((p / ".git").exists() or ((p / "HEAD").is_file() and (p / "objects").is_dir()))


def _checkout(source: str, ref: str | None, path: Path, git_dir: Path, env: dict[str, str]) -> str:
    fix_repo = "check the path or URL, and that it is a git repository you can read"
    _run_git(
        ["-c", "protocol.ext.allow=never", "clone", "--bare", "--no-hardlinks", "--quiet",
         "--", source, str(git_dir)],
        what=f"cannot clone {source}", fix=fix_repo,
    )  # fmt: skip
    wanted = ref or "HEAD"
    try:
        base = _run_git(
            ["--git-dir", str(git_dir), "rev-parse", "--verify", "--quiet", "--end-of-options",
             f"{wanted}^{{commit}}"],
            env=env, what=f"ref {wanted!r} not found in {source}",
            fix=f"pass --ref with a branch, tag or commit that exists (`git ls-remote {source}`)",
        ).strip()  # fmt: skip
    except WorkspaceError as e:
        raise WorkspaceError(
            f"ref {wanted!r} not found in {source}; fix: pass --ref with a branch, tag or "
            f"commit that exists (`git ls-remote {source}`)"
        ) from e
    fix = "free disk space, or raise the template's workspace_size"
    what = f"cannot check out {source}@{wanted}"
    _run_git(["clone", "--no-hardlinks", "--no-checkout", "--quiet",
              "--config", "user.name=sandfleet agent",
              "--config", "user.email=agent@sandfleet.invalid", str(git_dir), str(path)],
             env=env, what=what, fix=fix)  # fmt: skip
    _run_git(["-C", str(path), "checkout", "--quiet", "--detach", base],
             env=env, what=what, fix=fix)  # fmt: skip
    _run_git(["-C", str(path), "config", "remote.origin.url", source], env=env, what=what, fix=fix)
    return base


def _snapshot(path: Path, git_dir: Path, root: Path) -> str:
    """Record the copied directory as the base commit of a fresh bare repository."""
    what, fix = f"cannot snapshot {path}", "check the directory is readable"
    env = _isolated_env(root)
    _run_git(["init", "--bare", "--quiet", str(git_dir)], env=env, what=what, fix=fix)
    scratch = {**env, **_BASE_AUTHOR, "GIT_INDEX_FILE": str(root / "base.index"),
               "GIT_DIR": str(git_dir), "GIT_WORK_TREE": str(path)}  # fmt: skip
    _run_git([*_SAFE_GIT, "add", "-A"], env=scratch, cwd=path, what=what, fix=fix)
    tree = _run_git(["write-tree"], env=scratch, what=what, fix=fix).strip()
    message = "sandfleet: workspace as given"
    return _run_git(["commit-tree", tree, "-m", message], env=scratch, what=what, fix=fix).strip()


def collect_diff(ws: Workspace, patch_path: Path) -> DiffSummary:
    """Write the binary-safe diff base..worktree (tracked and new files) to `patch_path`."""
    patch_path.parent.mkdir(parents=True, exist_ok=True)
    if ws.base_commit == EMPTY_TREE and _is_empty(ws.path):  # empty then, empty now
        patch_path.write_bytes(b"")
        return DiffSummary(patch_path, 0, _EMPTY_SHA256, 0, 0, 0)
    env = {
        **_isolated_env(ws.root),
        "GIT_DIR": str(ws.git_dir),
        "GIT_WORK_TREE": str(ws.path),
        "GIT_INDEX_FILE": str(ws.root / "diff.index"),
    }
    what, fix = f"cannot diff the workspace {ws.path}", "see git's message above"
    if not ws.git_dir.exists():  # it started empty: the repository is made now
        _run_git(["init", "--bare", "--quiet", str(ws.git_dir)], env=_isolated_env(ws.root),
                 what=what, fix=fix)  # fmt: skip
    _run_git([*_SAFE_GIT, "read-tree", ws.base_commit], env=env, what=what, fix=fix)
    _run_git([*_SAFE_GIT, "add", "-A", "--", "."], env=env, cwd=ws.path, what=what, fix=fix)
    diff = ["diff", "--cached", "--no-ext-diff", "--no-textconv", "--no-color", "--no-renames"]
    with patch_path.open("wb") as out:
        _run_git([*_SAFE_GIT, *diff, "--binary", "--full-index", ws.base_commit],
                 env=env, stdout=out.fileno(), what=what, fix=fix)  # fmt: skip
    numstat = _run_git(
        [*_SAFE_GIT, *diff, "--numstat", "-z", ws.base_commit], env=env, what=what, fix=fix
    )
    files = insertions = deletions = 0
    for entry in numstat.split("\0"):
        parts = entry.split("\t")
        if len(parts) < 3:
            continue
        files += 1
        insertions += int(parts[0]) if parts[0].isdigit() else 0
        deletions += int(parts[1]) if parts[1].isdigit() else 0
    digest = hashlib.sha256()
    with patch_path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return DiffSummary(
        patch_path=patch_path,
        size_bytes=patch_path.stat().st_size,
        sha256=digest.hexdigest(),
        files_changed=files,
        insertions=insertions,
        deletions=deletions,
    )


def read_owner(root: Path) -> str | None:
    """The owner token recorded in a workspace, or None when missing or unreadable."""
    try:
        data = json.loads((root / "owner.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    owner = data.get("owner") if isinstance(data, dict) else None
    return owner if isinstance(owner, str) else None


def remove_workspace(root: Path) -> None:
    """Unmount (if a tmpfs) and delete an attempt's workspace. No-op when already gone."""
    repo = root / "repo"
    if os.path.ismount(repo):
        problem = _umount(repo)
        if problem is not None:
            raise WorkspaceError(
                f"cannot unmount the workspace tmpfs {repo}: {problem}; "
                "fix: stop what still uses it (its sandbox?) and run `sandfleet sandbox reap`"
            )
    try:
        shutil.rmtree(root)
    except FileNotFoundError:
        return
    except OSError as e:
        raise WorkspaceError(
            f"cannot delete the workspace {root}: {e}; fix: delete it as root "
            "(files made in the sandbox belong to uid 10001)"
        ) from None
    for parent in (root.parent, root.parent.parent):  # tidy empty task/batch dirs
        try:
            parent.rmdir()
        except OSError:
            break
