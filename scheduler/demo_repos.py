"""The demo's repositories: `configs/demo/<name>/` sources made into local git repositories.

`make demo` runs `python -m scheduler.demo_repos`, which writes one repository per source
folder (a folder of `configs/demo/` holding a `pyproject.toml`) under
`<checkout>/sandfleet-data/demo-repos/<name>`, where `configs/batches/demo*.yaml` find
them (`repo: ../../sandfleet-data/demo-repos/<name>`, relative to the batch file).

Each repository has one commit on `main` made with a fixed author, committer and date
and no user or system git config, so the same sources always give the same commit hash.
Idempotent: a repository whose commit is already the right one is left alone; one built
from older sources is replaced (atomically: built beside it, then renamed into place).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from accounting.config import configs_dir, repo_root
from accounting.errors import ConfigError, WorkspaceError

__all__ = ["DemoRepo", "default_dest", "demo_sources", "main", "make_demo_repos"]

_SKIP = {"__pycache__", ".pytest_cache", ".git"}
_GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": "/dev/null",
    "GIT_AUTHOR_NAME": "sandfleet demo",
    "GIT_AUTHOR_EMAIL": "demo@sandfleet.invalid",
    "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "sandfleet demo",
    "GIT_COMMITTER_EMAIL": "demo@sandfleet.invalid",
    "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+00:00",
    "PATH": "/usr/local/bin:/usr/bin:/bin",
}


@dataclass(frozen=True)
class DemoRepo:
    """One demo repository: where it came from, where it is, its commit, what happened."""

    name: str
    source: Path
    path: Path
    commit: str
    action: str  # "created", "updated" or "unchanged"


def default_dest() -> Path:
    """`<checkout>/sandfleet-data/demo-repos`: where the demo batches look."""
    return repo_root() / "sandfleet-data" / "demo-repos"


def demo_sources(root: Path | None = None) -> list[Path]:
    """Every source folder under `configs/demo/` (one with a pyproject.toml), by name."""
    base = root if root is not None else configs_dir() / "demo"
    return sorted(p.parent for p in base.glob("*/pyproject.toml"))


def _git(args: Sequence[str], cwd: Path) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=_GIT_ENV, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise WorkspaceError(
            f"git {' '.join(args)} in {cwd} failed: {done.stderr.strip()} "
            "(fix: check that git is installed and the folder is writable)"
        )
    return done.stdout.strip()


def _copy_sources(source: Path, dest: Path) -> None:
    """Copy the files (not caches), each with mode 0644 so the tree hash is stable."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if _SKIP & set(rel.parts) or path.suffix == ".pyc" or not path.is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        target.chmod(0o644)


def _build(source: Path, work: Path) -> str:
    """A fresh repository of `source` in `work`; returns its commit hash."""
    _copy_sources(source, work)
    _git(["init", "--quiet", "--template=", "--initial-branch=main"], work)
    _git(["add", "--all"], work)
    _git(["commit", "--quiet", "--no-gpg-sign", "-m", f"{source.name}: initial import"], work)
    return _git(["rev-parse", "HEAD"], work)


def _is_current(path: Path, commit: str) -> bool:
    """`path` is a repository at `commit` with a clean work tree."""
    if not (path / ".git").is_dir():
        return False
    try:
        head = _git(["rev-parse", "--verify", "--quiet", "refs/heads/main"], path)
        return head == commit and _git(["status", "--porcelain"], path) == ""
    except WorkspaceError:  # not readable as a repository: rebuild it
        return False


def make_demo_repos(
    dest: Path | None = None, sources: Sequence[Path] | None = None
) -> list[DemoRepo]:
    """Create or refresh one git repository per demo source under `dest`."""
    dest = dest if dest is not None else default_dest()
    sources = list(sources) if sources is not None else demo_sources()
    if not sources:
        raise ConfigError(
            f"no demo sources in {configs_dir() / 'demo'} (fix: restore configs/demo)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    repos = []
    for source in sources:
        path = dest / source.name
        with tempfile.TemporaryDirectory(prefix=f".{source.name}-", dir=dest) as tmp:
            work = Path(tmp) / "repo"
            work.mkdir()
            commit = _build(source, work)
            if _is_current(path, commit):
                action = "unchanged"
            else:
                action = "created" if not path.exists() else "updated"
                if path.exists():
                    old = Path(tmp) / "old"
                    path.rename(old)  # removed with the temporary directory
                work.rename(path)
        repos.append(DemoRepo(source.name, source, path, commit, action))
    return repos


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make the demo's local git repositories.")
    parser.add_argument("--dest", type=Path, default=None, help=f"default: {default_dest()}")
    args = parser.parse_args(argv)
    for repo in make_demo_repos(args.dest):
        print(f"demo-repos: {repo.name:<10} {repo.commit[:12]} {repo.action:<9} {repo.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
