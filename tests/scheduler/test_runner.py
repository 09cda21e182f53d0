"""The attempt runner on one node: its result dict, its errors, and a cancel that leaves
nothing behind (the real Docker engine for the last one). No Ray cluster here."""

from __future__ import annotations

import _thread
import json
import pickle
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from accounting.policies import load_policies
from sandbox.attempt import archive_dir
from sandbox.container_spec import LABEL_BATCH
from sandbox.fake_backend import FakeBackend
from sandbox.templates import load_template
from sandbox.workspace import workspace_root
from scheduler.plan import Backend, plan_batch
from scheduler.runner import AttemptRequest, attempt_options, execute, workspace_source
from scheduler.spec import parse_batch


def _request(tmp_path: Path, command: str, *, backend: Backend, image: str = "img") -> Any:
    data = {
        "name": f"runner-{uuid.uuid4().hex[:6]}",
        "team": "demo",
        "tasks": [{"id": "t1", "repo": str(tmp_path / "src"), "command": command}],
    }
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "hello.txt").write_text("hi\n")
    plan = plan_batch(parse_batch(data, source=tmp_path / "b.yaml"), backend=backend,
                      policies=load_policies())  # fmt: skip
    task = plan.tasks[0]
    return AttemptRequest(
        batch=task.batch, task=task.task_id, attempt=1, team=task.team,
        template=plan.templates[task.template], image=image, command=task.command,
        repo=task.repo, ref=task.ref, timeout_s=30.0, env=(("K", "v"),),
        data_dir=str(tmp_path / "data"), backend=backend,
    )  # fmt: skip


def test_a_fake_attempt_returns_a_small_result_and_leaves_an_archive(tmp_path: Path) -> None:
    request = _request(tmp_path, "echo out; echo err >&2; exit 3", backend=Backend.FAKE)
    result = execute(FakeBackend(), request, node="node-1")
    assert result["outcome"] == "failed" and result["exit_code"] == 3
    assert result["node"] == "node-1" and result["error_type"] is None
    assert len(pickle.dumps(result)) < 100_000
    archive = Path(result["archive_dir"])
    assert (archive / "stdout.log").read_text() == "out\n"
    assert (archive / "stderr.log").read_text() == "err\n"
    assert not workspace_root(request.data_dir, request.batch, "t1", 1).exists()


def test_an_engine_error_becomes_an_error_result_naming_its_type(tmp_path: Path) -> None:
    request = _request(tmp_path, "true", backend=Backend.FAKE, image="missing:1")
    result = execute(FakeBackend(images={"present:1"}), request)
    assert result["outcome"] == "error" and result["error_type"] == "ImageError"
    assert "sandfleet images build" in result["error"]


def test_a_folder_that_is_not_a_repository_is_copied_and_a_repository_cloned(
    tmp_path: Path,
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert workspace_source(str(plain)) == (None, str(plain))
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    assert workspace_source(str(repo)) == (str(repo), None)
    url = "https://example.invalid/x.git"
    assert workspace_source(url) == (url, None)
    assert workspace_source("git@host:org/x.git") == ("git@host:org/x.git", None)


def test_attempt_options_take_the_templates_resources_and_one_slot() -> None:
    template = load_template("minimal")
    options = attempt_options(template, name="b/t#1")
    assert options == {
        "num_cpus": template.resources.cpus,
        "memory": template.resources.memory,
        "resources": {"sandbox_slots": 1},
        "max_retries": 0,
        "name": "b/t#1",
    }


@pytest.mark.docker
def test_a_cancel_stops_the_sandbox_and_removes_it_before_returning(
    tmp_path: Path, docker_client: Any, base_image: str
) -> None:
    from sandbox.docker_backend import DockerBackend

    request = _request(tmp_path, "sleep 60", backend=Backend.DOCKER, image=base_image)
    backend = DockerBackend(client=docker_client)
    labels = {LABEL_BATCH: request.batch}
    interrupted = threading.Event()

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(box.status == "running" for box in backend.list(labels)):
                interrupted.set()
                _thread.interrupt_main()  # what a non-force ray.cancel does in the worker
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=interrupt_when_running, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(backend, request)
    finally:
        watcher.join(70)
        left = backend.list(labels)
        for box in left:
            backend.remove(box.id)
    assert interrupted.is_set()
    archive = archive_dir(request.data_dir, request.batch, "t1", 1)
    archived = json.loads((archive / "result.json").read_text())
    assert archived["exit_code"] in (137, 143), "not stopped: `sleep 60` ran to its end"
    assert left == [], f"containers left behind: {[b.name for b in left]}"
    assert not workspace_root(request.data_dir, request.batch, "t1", 1).exists()
