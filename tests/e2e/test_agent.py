"""The reference agent against the real gateway, on the host: protocol, limits, demo script.

The agent (configs/images/python/agent/sandfleet_agent.py) runs as a host process under
the real forwarder (`python -m sandbox.forwarder`, on free loopback ports), which relays
to a real `Gateway` (task tokens, the scripted model, a real `BudgetBook`, the egress
proxy) on a unix socket: the same path as in a sandbox, minus the container (the
container is tests/e2e/test_agent_sandbox.py's job). The gateway resolves no name at all
(`Resolver({})`), and the only servers contacted are the ones these tests start.

The demo replay runs every task of configs/batches/demo*.yaml through
configs/scripts/demo.yaml in a checkout of its demo repository, and checks the agent's
exit code against the task's `expect` label and its `verify` command against the result.
The OOM task is left to the sandbox test: only a sandbox has the 1 GiB limit.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

from accounting.config import configs_dir
from accounting.pricing import load_pricing
from sandbox.credentials import AttemptRef, TaskCredentials
from sandbox.egress import Resolver
from sandbox.gateway import AttemptGrant, Gateway
from sandbox.gateway_thread import GatewayThread
from sandbox.recorder import MemorySink
from sandbox.scripted import Script, ScriptedProvider, ScriptRule, load_script
from sandbox.workspace import collect_diff, prepare_workspace, remove_workspace
from scheduler.budget import BudgetBook, BudgetClient, Caps
from scheduler.demo_repos import make_demo_repos
from scheduler.spec import TaskSpec, load_batch

AGENT = configs_dir() / "images" / "python" / "agent" / "sandfleet_agent.py"
DEMO_BATCHES = ("demo.yaml", "demo-research.yaml")
EXIT_FOR = {"succeeded": 0, "failed": 1, "stopped_by_rule": 3, "budget_exceeded": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HostRig:
    """A real gateway on a unix socket, and the agent under the real forwarder on the host."""

    def __init__(self, root: Path, script: Script) -> None:
        self.root = root
        self.sink = MemorySink()
        self.budgets: dict[str, int | None] = {}
        self.book = BudgetBook(lambda ref: Caps(task=self.budgets.get(ref.task)))
        provider = ScriptedProvider(script, name="scripted", models=["scripted"])
        self.batch = f"pytest-agent-{uuid.uuid4().hex[:8]}"
        self.thread = GatewayThread(
            lambda: Gateway(
                root / "gw",
                credentials=TaskCredentials(),
                providers={"scripted": provider},
                budget=BudgetClient.local(self.book),
                sink=self.sink,
                prices=load_pricing(),
                node="node-1",
                resolver=Resolver({}),  # resolves nothing: no egress can leave this host
            )
        ).start()

    def close(self) -> None:
        self.thread.stop()

    def run(
        self,
        task: str,
        prompt: str,
        workdir: Path,
        *,
        env: Mapping[str, str] | None = None,
        budget_nusd: int | None = None,
        timeout_s: float = 120,
    ) -> tuple[int, str]:
        """Run the agent on `task` in `workdir`; returns (exit code, log)."""
        self.budgets[task] = budget_nusd
        ref = AttemptRef("team-a", self.batch, task, 1)
        grant = AttemptGrant(ref, deadline=time.time() + 600, models=("scripted",))
        channel = self.thread.open_attempt(grant)
        llm, proxy = _free_port(), _free_port()
        child_env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.root),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OPENAI_BASE_URL": f"http://127.0.0.1:{llm}/v1",
            "OPENAI_API_KEY": channel.token,
            "NO_PROXY": "127.0.0.1,localhost",
            "SANDFLEET_TASK": task,
            "SANDFLEET_PROMPT": prompt,
            "SANDFLEET_WORKDIR": str(workdir),
            **{k: f"http://127.0.0.1:{proxy}" for k in ("HTTP_PROXY", "HTTPS_PROXY")},
            **{k: f"http://127.0.0.1:{proxy}" for k in ("http_proxy", "https_proxy")},
            **(env or {}),
        }
        argv = [sys.executable, "-m", "sandbox.forwarder", "--socket", str(channel.socket)]
        argv += ["--llm-port", str(llm), "--proxy-port", str(proxy)]
        argv += ["--token-file", "/nonexistent", "--", sys.executable, str(AGENT)]
        try:
            done = subprocess.run(
                argv, env=child_env, capture_output=True, text=True, timeout=timeout_s
            )
        finally:
            self.thread.close_attempt(ref)
        return done.returncode, done.stdout + done.stderr

    def events(self, task: str, kind: str) -> list[Mapping]:
        self.thread.flush()
        return [dict(e.payload) for e in self.sink.events(kind) if e.task == task]


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short directory (a unix socket path must stay under ~100 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="sfag-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@contextmanager
def _rig(root: Path, *rules: ScriptRule) -> Iterator[HostRig]:
    rig = HostRig(root, Script(rules=rules))
    try:
        yield rig
    finally:
        rig.close()


# -- the protocol and the limits ------------------------------------------------------------


def test_a_fenced_command_runs_and_done_ends_with_exit_0(short_root: Path, tmp_path: Path) -> None:
    rules = (
        ScriptRule(turn=1, reply="Writing it.\n```sh\necho hello > out.txt; echo wrote\n```"),
        ScriptRule(turn=2, prompt=r"\Aexit code: 0\n(?s:.*)wrote", reply="DONE: wrote out.txt"),
        ScriptRule(reply="GIVE UP: unexpected"),
    )
    with _rig(short_root, *rules) as rig:
        code, log = rig.run("t-done", "write hello to out.txt", tmp_path)
        calls = rig.events("t-done", "llm_call")
    assert code == 0, log
    assert (tmp_path / "out.txt").read_text() == "hello\n"
    assert "== done: wrote out.txt" in log
    assert [c["status"] for c in calls] == [200, 200]


def test_give_up_ends_with_exit_1(short_root: Path, tmp_path: Path) -> None:
    with _rig(short_root, ScriptRule(reply="GIVE UP: cannot be done")) as rig:
        code, log = rig.run("t-give-up", "do the impossible", tmp_path)
    assert code == 1, log
    assert "== gave up: cannot be done" in log


def test_the_agent_stops_at_its_step_limit_with_exit_3(short_root: Path, tmp_path: Path) -> None:
    with _rig(short_root, ScriptRule(reply="```sh\necho again\n```")) as rig:
        code, log = rig.run("t-steps", "loop", tmp_path, env={"SANDFLEET_MAX_STEPS": "3"})
        calls = rig.events("t-steps", "llm_call")
    assert code == 3, log
    assert len(calls) == 3
    assert "the step limit (3) was reached" in log


def test_a_reply_outside_the_protocol_gets_a_reminder(short_root: Path, tmp_path: Path) -> None:
    rules = (
        ScriptRule(turn=1, reply="I think I should look around."),
        ScriptRule(turn=2, prompt="one ```sh block", reply="DONE: understood"),
        ScriptRule(reply="GIVE UP: no reminder came"),
    )
    with _rig(short_root, *rules) as rig:
        code, log = rig.run("t-remind", "anything", tmp_path)
    assert code == 0, log


def test_a_402_from_the_gateway_ends_the_agent_with_exit_4(
    short_root: Path, tmp_path: Path
) -> None:
    long_reply = "```sh\ntrue\n```\n" + "This is a very long explanation. " * 100
    with _rig(short_root, ScriptRule(reply=long_reply)) as rig:
        code, log = rig.run("t-budget", "talk", tmp_path, budget_nusd=2_000_000)
        calls = rig.events("t-budget", "llm_call")
    assert code == 4, log
    assert "budget exhausted (HTTP 402)" in log
    assert calls[-1]["status"] == 402
    assert all(c["status"] == 200 for c in calls[:-1])


def test_a_failing_upstream_is_retried_then_exit_5(short_root: Path, tmp_path: Path) -> None:
    rule = ScriptRule(error={"status": 503, "message": "scripted outage"})
    with _rig(short_root, rule) as rig:
        code, log = rig.run("t-outage", "anything", tmp_path, env={"SANDFLEET_RETRY_BASE_S": "0"})
        calls = rig.events("t-outage", "llm_call")
    assert code == 5, log
    assert [c["status"] for c in calls] == [503] * 4  # the first try and three retries
    assert "the LLM endpoint failed 4 times" in log and "scripted outage" in log


def test_a_command_past_its_timeout_is_killed_and_reported(
    short_root: Path, tmp_path: Path
) -> None:
    rules = (
        ScriptRule(turn=1, reply="```sh\nsleep 60 & sleep 60; echo never\n```"),
        ScriptRule(turn=2, prompt=r"\Aexit code: 124 \(killed after", reply="DONE: it was killed"),
        ScriptRule(reply="GIVE UP: the timeout did not show"),
    )
    with _rig(short_root, *rules) as rig:
        code, log = rig.run("t-timeout", "wait", tmp_path, env={"SANDFLEET_COMMAND_TIMEOUT": "1"})
    assert code == 0, log


def test_without_a_prompt_the_agent_exits_2(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    done = subprocess.run([sys.executable, str(AGENT)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "set SANDFLEET_PROMPT" in done.stdout


def test_a_setting_that_is_not_a_number_exits_2(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}
    env |= {"SANDFLEET_PROMPT": "anything", "SANDFLEET_MAX_STEPS": "many"}
    done = subprocess.run([sys.executable, str(AGENT)], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "not a number" in done.stdout


def test_the_prompt_file_is_read(short_root: Path, tmp_path: Path) -> None:
    (tmp_path / "prompt.txt").write_text("the prompt from a file\n")
    rules = (
        ScriptRule(prompt="^the prompt from a file$", reply="DONE: read it"),
        ScriptRule(reply="GIVE UP: wrong prompt"),
    )
    with _rig(short_root, *rules) as rig:
        code, log = rig.run(
            "t-file", "", tmp_path, env={"SANDFLEET_PROMPT_FILE": str(tmp_path / "prompt.txt")}
        )
    assert code == 0, log


# -- the demo batches, replayed on the host -------------------------------------------------


def _demo_tasks() -> list[TaskSpec]:
    return [t for f in DEMO_BATCHES for t in load_batch(configs_dir() / "batches" / f).task_specs()]


HOST_TASKS = [t for t in _demo_tasks() if t.labels_dict.get("expect") != "oom"]


@pytest.fixture(scope="module")
def demo_repos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("demo-repos")
    make_demo_repos(dest)
    return dest


@pytest.fixture(scope="module")
def demo_rig() -> Iterator[HostRig]:
    root = Path(tempfile.mkdtemp(prefix="sfdemo-", dir="/tmp"))
    rig = HostRig(root, load_script(configs_dir() / "scripts" / "demo.yaml"))
    try:
        yield rig
    finally:
        rig.close()
        shutil.rmtree(root, ignore_errors=True)


def _verify(command: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run(
        ["sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
@pytest.mark.parametrize("task", HOST_TASKS, ids=lambda t: t.task_id)
def test_demo_task_ends_as_its_label_expects(
    task: TaskSpec, demo_rig: HostRig, demo_repos: Path, tmp_path: Path
) -> None:
    labels = task.labels_dict
    expect = labels["expect"]
    ws = prepare_workspace(
        tmp_path / "data", batch=demo_rig.batch, task=task.task_id, attempt=1, owner="pytest",
        size_bytes=1 << 30, repo=str(demo_repos / Path(task.repo).name), ref=task.ref,
        use_tmpfs=False,
    )  # fmt: skip
    try:
        # No streaming rules here: the loop task runs to its step limit (exit 3), within
        # its budget, repeating its command far past the repeated_command rule's 10.
        code, log = demo_rig.run(
            task.task_id, task.prompt, ws.path, env=task.env_dict, budget_nusd=task.budget_nusd
        )
        assert code == EXIT_FOR[expect], log
        if "verify" in labels:
            check = _verify(labels["verify"], ws.path)
            assert (check.returncode == 0) == (expect == "succeeded"), check.stdout + log
        if expect == "succeeded":
            assert collect_diff(ws, tmp_path / "diff.patch").files_changed >= 1
        scenario = labels.get("scenario")
        if scenario == "repeated_command":
            commands = [line for line in log.splitlines() if line.startswith("== step ")]
            runs = [c for c in commands if c.endswith("$ ls -la tests")]
            assert len(runs) == int(task.env_dict["SANDFLEET_MAX_STEPS"]) >= 10
        if scenario == "denied_egress":
            decisions = demo_rig.events(task.task_id, "egress_decision")
            assert sorted(d["host"] for d in decisions) == [
                "mirror.invalid", "pypi.invalid", "pypi.invalid"
            ]  # fmt: skip
            assert not any(d["allowed"] for d in decisions)
            assert len(re.findall(r"^https?://\S+ -> refused: ", log, re.MULTILINE)) == 3
        if scenario == "budget":
            calls = demo_rig.events(task.task_id, "llm_call")
            assert calls[-1]["status"] == 402 and len(calls) >= 2
    finally:
        remove_workspace(ws.root)
