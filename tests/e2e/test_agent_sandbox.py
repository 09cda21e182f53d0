"""The reference agent in a real hardened sandbox: the python image, its template's agent
command, the forwarder, a real gateway with the demo's scripted model, and real Parquet.

The container is the project's hardened spec (`container_spec` of the `python` template:
uid 10001, no capabilities, seccomp, read-only root, network none, 1 GiB of memory) with
the attempt's socket directory and the forwarder mounted read-only; the agent is the one
baked into the image (`agent_command` of configs/templates/python.yaml). The workspace
is a real checkout (`prepare_workspace`) of a demo repository made by
`scheduler.demo_repos`; its diff is collected the way an attempt's is, applied to a fresh
clone, and the task's `verify` command is run there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

import sandbox.forwarder
from accounting.config import configs_dir
from accounting.pricing import load_pricing
from accounting.writer import LedgerWriter
from sandbox.container_spec import LABEL_BATCH, container_spec, sandbox_labels, sandbox_name
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.egress import Resolver
from sandbox.gateway import AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread
from sandbox.images import image_ref
from sandbox.scripted import ScriptedProvider
from sandbox.templates import load_template
from sandbox.workspace import collect_diff, prepare_workspace, remove_workspace
from scheduler.budget import BudgetBook, BudgetClient, Caps
from scheduler.demo_repos import make_demo_repos
from scheduler.spec import TaskSpec, load_batch

pytestmark = [pytest.mark.docker, pytest.mark.slow]


@dataclass(frozen=True)
class SandboxRun:
    exit_code: int
    oom: bool
    log: str
    diff: Path
    batch: str


def _task(task_id: str) -> TaskSpec:
    tasks = load_batch(configs_dir() / "batches" / "demo.yaml").task_specs()
    return next(t for t in tasks if t.task_id == task_id)


@pytest.fixture(scope="module")
def python_image(docker_client: Any) -> str:
    from docker.errors import ImageNotFound

    image = image_ref("python")
    try:
        docker_client.images.get(image)
    except ImageNotFound:
        reason = f"image {image} is not built (run `sandfleet images build python`)"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{reason} (CI=true: images are required; run `make setup`)")
        pytest.skip(reason)
    return image


@pytest.fixture(scope="module")
def demo_repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("demo-repos")
    make_demo_repos(dest)
    return dest


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short directory for the gateway's sockets (unix socket paths stay < ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sfsb-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def run_in_sandbox(
    docker_client: Any, image: str, task: TaskSpec, repo: Path, root: Path, data_dir: Path
) -> SandboxRun:
    """One demo task, start to finish, in a hardened python sandbox; everything removed."""
    writer = LedgerWriter(data_dir, node="node-1", signing_key=root / "audit.key")
    book = BudgetBook(lambda ref: Caps(task=task.budget_nusd))
    script = ScriptedProvider.from_file(
        configs_dir() / "scripts" / "demo.yaml", name="scripted", models=["scripted"]
    )
    thread = GatewayThread(
        lambda: Gateway(
            root / "gw", credentials=TaskCredentials(), providers={"scripted": script},
            budget=BudgetClient.local(book), sink=writer, prices=load_pricing(),
            node="node-1", resolver=Resolver({}),
        )
    ).start()  # fmt: skip
    batch = f"pytest-agent-{uuid.uuid4().hex[:8]}"
    template = load_template("python")
    ws = prepare_workspace(
        data_dir, batch=batch, task=task.task_id, attempt=1, owner="pytest",
        size_bytes=template.resources.workspace_size, repo=str(repo), ref=task.ref,
        use_tmpfs=False,
    )  # fmt: skip
    container = None
    try:
        ref = AttemptRef(task.team, batch, task.task_id, 1)
        channel = thread.open_attempt(
            AttemptGrant(ref, deadline=time.time() + 600, models=("scripted",))
        )
        env = {k: v for k, v in channel.env().items() if k != "OPENAI_API_KEY"}  # token file
        env |= task.env_dict | {"SANDFLEET_TASK": task.task_id, "SANDFLEET_PROMPT": task.prompt}
        spec = container_spec(
            template,
            image=image,
            labels=sandbox_labels(
                batch=batch, task=task.task_id, attempt=1, team=task.team, owner="pytest"
            ),
            workspace_host_path=str(ws.path),
            name=sandbox_name(batch, task.task_id, 1, uuid.uuid4().hex[:8]),
            env=env,
            command=[
                "python3", "/opt/sandfleet/forwarder.py", "--socket", "/run/sandfleet/gw.sock",
                "--", *template.agent_command,
            ],
        )  # fmt: skip
        spec["volumes"] |= channel.volumes()
        spec["volumes"][str(Path(sandbox.forwarder.__file__))] = {
            "bind": "/opt/sandfleet/forwarder.py",
            "mode": "ro",
        }
        assert spec["network_mode"] == "none" and spec["read_only"] and spec["cap_drop"] == ["ALL"]
        container = docker_client.containers.create(**spec)
        container.start()
        status = container.wait(timeout=300)
        container.reload()
        log = container.logs(stdout=True, stderr=True).decode(errors="replace")
        oom = bool(container.attrs["State"]["OOMKilled"])
        diff = collect_diff(ws, data_dir / "diff.patch").patch_path
    finally:
        if container is not None:
            container.remove(force=True)
        remove_workspace(ws.root)
        thread.stop()
        writer.close()
    return SandboxRun(status["StatusCode"], oom, log, diff, batch)


def _verify_on_fresh_clone(repo: Path, diff: Path, command: str, where: Path) -> str:
    subprocess.run(["git", "clone", "--quiet", str(repo), str(where)], check=True)
    if diff.stat().st_size:
        subprocess.run(["git", "apply", "--index", str(diff)], cwd=where, check=True)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run(
        ["sh", "-c", command], cwd=where, env=env, capture_output=True, text=True, check=False
    )
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def test_the_image_agent_fixes_a_demo_repository_in_a_hardened_sandbox(
    docker_client: Any, python_image: str, demo_repos: Path, short_root: Path, tmp_path: Path
) -> None:
    task = _task("invoicing-fix-all")
    repo = demo_repos / "invoicing"
    data_dir = tmp_path / "data"
    before = _verify_on_fresh_clone(repo, Path(os.devnull), task.labels_dict["verify"],
                                    tmp_path / "before")  # fmt: skip
    assert not before.startswith("exit 0\n"), before

    run = run_in_sandbox(docker_client, python_image, task, repo, short_root, data_dir)

    assert run.exit_code == 0, run.log
    assert "== done: the change is made and its tests pass." in run.log
    after = _verify_on_fresh_clone(repo, run.diff, task.labels_dict["verify"], tmp_path / "after")
    assert after.startswith("exit 0\n"), after + run.log
    patch = run.diff.read_text()
    assert "+pytest==7.2.1" in patch and "ROUND_HALF_UP" in patch
    assert "__pycache__" not in patch and ".pytest_cache" not in patch

    events = f"read_parquet('{data_dir}/ledger/events/**/*.parquet', hive_partitioning = true)"
    query = f"""SELECT json_extract(payload, '$.status')::INT,
                       json_extract(payload, '$.output')::INT
                FROM {events} WHERE kind = 'llm_call' AND batch = '{run.batch}'
                ORDER BY event_seq"""
    calls = duckdb.connect().execute(query).fetchall()
    assert [status for status, _ in calls] == [200, 200, 200, 200]  # four turns
    assert all(output > 0 for _, output in calls)
    assert not docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_BATCH}={run.batch}"}
    )


def test_the_memory_hog_task_is_oom_killed_in_its_sandbox(
    docker_client: Any, python_image: str, demo_repos: Path, short_root: Path, tmp_path: Path
) -> None:
    task = _task("semver-fuzz-oom")
    run = run_in_sandbox(
        docker_client, python_image, task, demo_repos / "semver", short_root, tmp_path / "data"
    )
    assert run.oom is True, run.log
    assert "Killed\n== exit 137 " in run.log  # the shell's report of its child's SIGKILL
    assert run.exit_code == 1  # the agent survives its command's OOM kill and gives up
