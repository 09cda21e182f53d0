"""The demo's content: its batches, its repositories' real bugs, and the scripted model's fixes.

No gateway and no sandbox here (tests/e2e/test_agent.py replays the whole script through
the real gateway; test_agent_sandbox.py runs it in the python image): these tests read
the YAML, make the demo repositories, and run the script's own shell commands on the
host in temporary checkouts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from accounting.config import configs_dir
from sandbox.scripted import Script, load_script
from scheduler.demo_repos import demo_sources, make_demo_repos
from scheduler.spec import TaskSpec, load_batch

BATCHES = configs_dir() / "batches"
FENCE = re.compile(r"```(?:sh|bash|shell)?[ \t]*\n(.*?)```", re.DOTALL)


def _tasks(name: str = "demo.yaml") -> list[TaskSpec]:
    return load_batch(BATCHES / name).task_specs()


ALL_TASKS = _tasks("demo.yaml") + _tasks("demo-research.yaml")
VERIFIED = [t for t in ALL_TASKS if "verify" in t.labels_dict]


@pytest.fixture(scope="module")
def script() -> Script:
    return load_script(configs_dir() / "scripts" / "demo.yaml")


@pytest.fixture(scope="module")
def demo_repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("demo-repos")
    make_demo_repos(dest)
    return dest


def _command(script: Script, task: str, turn: int) -> str | None:
    """The fenced command of the task's OWN rule for `turn` (not a generic one)."""
    for rule in script.rules:
        if rule.task == task and rule.turn in (turn, None) and (m := FENCE.search(rule.reply)):
            return m.group(1).strip()
    return None


def _sh(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"  # python3 with pytest
    return subprocess.run(
        ["sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _checkout(repos: Path, name: str, where: Path) -> Path:
    subprocess.run(["git", "clone", "--quiet", str(repos / name), str(where)], check=True)
    return where


# -- the batches ----------------------------------------------------------------------------


def test_the_demo_batch_has_24_tasks_over_3_repos_and_3_task_types() -> None:
    tasks = _tasks()
    assert len(tasks) >= 24
    assert len({Path(t.repo).name for t in tasks}) >= 3
    assert len({t.task_type for t in tasks}) >= 3
    assert {t.template for t in tasks} == {"python"} and {t.model for t in tasks} == {"scripted"}
    assert all(t.budget_nusd for t in tasks)


def test_the_two_demo_batches_are_two_teams_with_unique_task_ids() -> None:
    teams = {load_batch(BATCHES / f).team for f in ("demo.yaml", "demo-research.yaml")}
    assert teams == {"demo", "demo-research"}
    ids = [t.task_id for t in ALL_TASKS]
    assert len(ids) == len(set(ids))  # the script is keyed by task id across both


def test_every_task_expects_an_outcome_and_each_misbehaviour_is_there_once() -> None:
    expected = Counter(t.labels_dict["expect"] for t in ALL_TASKS)
    assert set(expected) == {"succeeded", "failed", "oom", "budget_exceeded", "stopped_by_rule"}
    assert expected["oom"] == expected["budget_exceeded"] == expected["stopped_by_rule"] == 1
    assert expected["failed"] >= 2
    assert expected["succeeded"] > len(ALL_TASKS) / 2
    judged = [t for t in ALL_TASKS if t.labels_dict["expect"] in ("succeeded", "failed")]
    assert all("verify" in t.labels_dict for t in judged)  # how to check the work afterwards
    scenarios = Counter(t.labels_dict.get("scenario") for t in ALL_TASKS)
    assert scenarios["denied_egress"] == 1 and scenarios["budget"] == 1


def test_the_demo_repositories_the_batches_name_exist_as_sources() -> None:
    names = {p.name for p in demo_sources()}
    assert {Path(t.repo).name for t in ALL_TASKS} <= names
    assert all(Path(t.repo).parent.name == "demo-repos" for t in ALL_TASKS)


# -- the script -----------------------------------------------------------------------------


def test_every_task_has_rules_of_its_own(script: Script) -> None:
    named = {rule.task for rule in script.rules}
    assert {t.task_id for t in ALL_TASKS} - named == set()
    assert named - {t.task_id for t in ALL_TASKS} == {None}


@pytest.mark.parametrize(
    "task", [t for t in VERIFIED if t.labels_dict.get("scenario") is None], ids=lambda t: t.task_id
)
def test_the_scripts_check_is_the_tasks_verify_label(task: TaskSpec, script: Script) -> None:
    check = _command(script, task.task_id, 3)
    assert check is not None
    assert " ".join(check.split()) == " ".join(task.labels_dict["verify"].split())


# -- the repositories -----------------------------------------------------------------------


@pytest.mark.parametrize("source", demo_sources(), ids=lambda p: p.name)
def test_every_demo_repository_fails_its_tests_as_shipped(
    source: Path, demo_repos: Path, tmp_path: Path
) -> None:
    repo = _checkout(demo_repos, source.name, tmp_path / source.name)
    done = _sh("python3 -m pytest -q -p no:cacheprovider", repo)
    assert done.returncode == 1, done.stdout  # 1: tests ran and some failed
    assert re.search(r"\d+ failed, \d+ passed", done.stdout), done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("task", VERIFIED, ids=lambda t: t.task_id)
def test_each_tasks_verify_fails_before_its_work(
    task: TaskSpec, demo_repos: Path, tmp_path: Path
) -> None:
    repo = _checkout(demo_repos, Path(task.repo).name, tmp_path / "repo")
    done = _sh(task.labels_dict["verify"], repo)
    assert done.returncode != 0, done.stdout


@pytest.mark.parametrize("source", demo_sources(), ids=lambda p: p.name)
def test_the_scripts_fix_all_makes_the_whole_suite_pass(
    source: Path, script: Script, demo_repos: Path, tmp_path: Path
) -> None:
    repo = _checkout(demo_repos, source.name, tmp_path / source.name)
    fix = _command(script, f"{source.name}-fix-all", 2)
    assert fix is not None
    edit = _sh(fix, repo)
    assert edit.returncode == 0, edit.stdout + edit.stderr
    done = _sh("python3 -m pytest -q -p no:cacheprovider", repo)
    assert done.returncode == 0, done.stdout
    assert not list(repo.rglob("__pycache__")) and not (repo / ".pytest_cache").exists()


def test_demo_repositories_are_stable_and_idempotent(tmp_path: Path) -> None:
    first = make_demo_repos(tmp_path / "a")
    again = make_demo_repos(tmp_path / "a")
    elsewhere = make_demo_repos(tmp_path / "b")
    assert {r.action for r in first} == {"created"}
    assert {r.action for r in again} == {"unchanged"}
    assert [r.commit for r in first] == [r.commit for r in again] == [r.commit for r in elsewhere]
    for repo in first:
        log = subprocess.run(
            ["git", "log", "--format=%an %ad", "--date=iso", "main"],
            cwd=repo.path, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert log == "sandfleet demo 2024-01-01 00:00:00 +0000\n"


def test_a_changed_source_replaces_its_repository(tmp_path: Path) -> None:
    source = tmp_path / "src" / "tiny"
    shutil.copytree(demo_sources()[0], source)
    (source / "__pycache__").mkdir()
    (source / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    [made] = make_demo_repos(tmp_path / "repos", [source])
    (source / "README.md").write_text("changed\n")
    [updated] = make_demo_repos(tmp_path / "repos", [source])
    assert updated.action == "updated" and updated.commit != made.commit
    assert (updated.path / "README.md").read_text() == "changed\n"
    assert not (updated.path / "__pycache__").exists()
    assert [p.name for p in (tmp_path / "repos").iterdir()] == ["tiny"]  # no temporary left
