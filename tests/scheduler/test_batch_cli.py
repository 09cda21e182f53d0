"""`sandfleet run|submit|status|cancel|resume|logs|diff` as a user calls them.

Invalid input (hand-written and hypothesis-generated) exits 2 with an error naming the
file and the fix, and never starts Ray. A valid batch runs on an embedded Ray with the
fake backend; `submit` goes through a real local Ray head's job server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.cli import main
from scheduler.driver import exit_code, job_request
from scheduler.plan import Backend
from scheduler.testing import (
    kill_leftovers,
    source_dir,
    state_rows,
    stop_fleet,
    terminal_counts,
)


def sandfleet(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process: (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything tries to start or join a Ray cluster."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Ray was started for invalid input")

    monkeypatch.setattr(ray, "init", refuse)


def valid_batch(tmp_path: Path) -> dict[str, Any]:
    src = source_dir(tmp_path)
    return {
        "name": "cli-batch",
        "team": "demo",
        "defaults": {"template": "minimal", "timeout": 60, "max_attempts": 2},
        "tasks": [
            {"id": "ok", "repo": str(src), "command": "echo hello"},
            {"id": "edit", "repo": str(src), "command": "echo more >> README"},
            {"id": "bad", "repo": str(src), "command": "echo oops >&2; exit 3"},
        ],
    }


def write(tmp_path: Path, data: Any, name: str = "batch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


INVALID = {
    "unknown template": lambda d: d["defaults"].update(template="no-such-template"),
    "duplicate ids": lambda d: d["tasks"][1].update(id="ok"),
    "bad timeout": lambda d: d["defaults"].update(timeout=0),
    "unknown field": lambda d: d["tasks"][0].update(colour="blue"),
    "no tasks": lambda d: d.update(tasks=[]),
    "bad name": lambda d: d.update(name="has spaces"),
    "task too big for the team": lambda d: d.update(team="tiny"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_batch_exits_2_with_a_clear_error_and_starts_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    data = valid_batch(tmp_path)
    INVALID[case](data)
    path = write(tmp_path, data)
    policies = write(tmp_path, TINY_POLICIES, "policies.yaml")
    code, out, err = sandfleet(
        ["run", str(path), "--data-dir", str(tmp_path / "d"), "--policies", str(policies)], capsys
    )
    assert code == 2, (case, out, err)
    assert err.startswith("error: ") and "fix" in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "d").exists(), "a ledger was started for invalid input"


TINY_POLICIES = {
    "defaults": {"weight": 1, "max_sandboxes": 4, "max_cpus": 4, "max_memory": "8g",
                 "daily_usd": None, "monthly_usd": None},
    "teams": {"tiny": {"max_memory": "64m"}},
}  # fmt: skip


def test_a_missing_file_a_yaml_error_and_a_bad_flag_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    code, _, err = sandfleet(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err
    code, _, err = sandfleet(["run", str(write(tmp_path, "name: [unclosed\n"))], capsys)
    assert code == 2 and "batch.yaml" in err
    path = write(tmp_path, valid_batch(tmp_path))
    code, _, err = sandfleet(["run", str(path), "--backend", "podman"], capsys)
    assert code == 2 and "podman" in err
    code, _, err = sandfleet(["resume", "never-ran", "--data-dir", str(tmp_path)], capsys)
    assert code == 2 and "never-ran" in err


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.text(max_size=12),
    st.floats(allow_nan=True), st.lists(st.integers(), max_size=2),
)  # fmt: skip
_paths = st.sampled_from(
    [("name",), ("team",), ("priority",), ("budget",), ("defaults", "timeout"),
     ("defaults", "max_attempts"), ("defaults", "template"), ("defaults", "budget"),
     ("tasks", 0, "repo"), ("tasks", 0, "id"), ("tasks", 1, "command"), ("tasks", 2, "env"),
     ("tasks", 0, "timeout"), ("tasks", 1, "max_attempts"), ("tasks",), ("defaults",)]
)  # fmt: skip


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(path=_paths, value=_scalars)
def test_generated_batches_either_are_valid_or_exit_2_without_starting_anything(
    path: tuple[Any, ...], value: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    no_ray: None,
) -> None:  # fmt: skip
    from accounting.errors import ConfigError
    from accounting.policies import load_policies
    from scheduler.plan import plan_batch
    from scheduler.spec import load_batch

    data = valid_batch(tmp_path)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    batch = write(tmp_path, data)
    try:
        plan_batch(load_batch(batch), backend=Backend.FAKE, policies=load_policies())
    except ConfigError:
        valid = False
    else:
        valid = True
    if valid:
        return  # the mutation happened to be valid (e.g. another good timeout)
    code, _, err = sandfleet(["run", str(batch), "--backend", "fake",
                              "--data-dir", str(tmp_path / "d")], capsys)  # fmt: skip
    assert code == 2, err
    assert err.startswith("error: ") and str(batch) in err and "fix" in err, err
    assert not ray.is_initialized()


def test_exit_status_is_0_only_when_every_task_succeeded() -> None:
    assert exit_code({"total": 2, "states": {"succeeded": 2}}) == 0
    assert exit_code({"total": 2, "states": {"succeeded": 1, "cancelled": 1}}) == 1


@pytest.fixture
def private_ray_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    tmp = tempfile.mkdtemp(prefix="sfray-", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", tmp)
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        yield tmp
    finally:
        if ray.is_initialized():
            ray.shutdown()
        kill_leftovers(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.ray
def test_run_on_an_embedded_ray_then_status_logs_and_diff_from_the_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], private_ray_dir: str
) -> None:
    path = write(tmp_path, valid_batch(tmp_path))
    data = str(tmp_path / "data")
    code, out, err = sandfleet(["run", str(path), "--backend", "fake", "--data-dir", data,
                                "--slots", "2", "--dashboard-port", "0", "--json"],
                               capsys)  # fmt: skip
    assert code == 1, err  # one task exits 3
    assert "dashboard: http://127.0.0.1:" in err  # the Monitor served it during the run
    report = json.loads(out)
    assert report["states"] == {"succeeded": 2, "failed": 1} and report["exit_code"] == 1
    assert not ray.is_initialized(), "the embedded cluster was not shut down"

    code, out, _ = sandfleet(["status", "--data-dir", data, "--json"], capsys)
    assert code == 0
    (row,) = json.loads(out)
    assert row["states"] == {"succeeded": 2, "failed": 1} and row["done"] and row["total"] == 3

    code, out, _ = sandfleet(["logs", "bad", "--data-dir", data, "--json"], capsys)
    assert code == 0 and json.loads(out)["stderr"] == "oops\n"
    code, out, _ = sandfleet(["diff", f"{report['batch']}/edit", "--data-dir", data], capsys)
    assert code == 0 and "+more" in out
    code, _, err = sandfleet(["logs", "edit", "--attempt", "2", "--data-dir", data], capsys)
    assert code == 2 and "attempt 2" in err

    code, _, err = sandfleet(["run", str(path), "--backend", "fake", "--data-dir", data], capsys)
    assert code == 2 and "already in the ledger" in err and "sandfleet resume" in err

    # Resuming a finished batch runs nothing again and records no second outcome.
    code, out, err = sandfleet(["resume", report["batch"], "--data-dir", data, "--slots", "2",
                                "--no-dashboard", "--json"], capsys)  # fmt: skip
    assert "dashboard:" not in err
    assert code == 1, err
    assert json.loads(out)["states"] == {"succeeded": 2, "failed": 1}
    rows = state_rows(data, report["batch"])
    assert set(terminal_counts(rows).values()) == {1} and len(rows) == 9  # 3 x queued/run/end


def test_a_job_request_runs_the_same_driver_on_the_head(tmp_path: Path) -> None:
    path = write(tmp_path, valid_batch(tmp_path))
    request = job_request(path, batch_id="b-1", data_dir="~/sf-data", backend=Backend.FAKE,
                          nonce="n1")  # fmt: skip
    assert request == {
        "entrypoint": "sandfleet run batch.yaml --data-dir '~/sf-data' --address auto "
        "--backend fake --json",
        "runtime_env": {"working_dir": str(tmp_path)},
        "submission_id": "sandfleet-b-1-n1",
        "metadata": {"sandfleet.batch": "b-1", "sandfleet.backend": "fake"},
    }
    from accounting.errors import ConfigError

    with pytest.raises(ConfigError, match="absolute path"):
        job_request(path, batch_id="b-1", data_dir="rel/dir", backend=Backend.FAKE, nonce="n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.ray
@pytest.mark.slow
def test_submit_runs_the_batch_as_a_job_on_a_local_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], private_ray_dir: str,
    monkeypatch: pytest.MonkeyPatch, wait_for: Any,
) -> None:  # fmt: skip
    from ray.job_submission import JobStatus, JobSubmissionClient

    bin_dir = Path(sys.executable).parent  # the job's shell must find this venv's sandfleet
    if not (bin_dir / "sandfleet").exists():
        pytest.skip("the sandfleet command is not installed (pip install -e .)")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    data = valid_batch(tmp_path)
    data["tasks"] = data["tasks"][:2]  # both succeed
    path = write(tmp_path, data)
    port = _free_port()
    ray.init(address="local", num_cpus=2, resources={"sandbox_slots": 2}, include_dashboard=True,
             dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=False)  # fmt: skip
    try:
        address = f"http://127.0.0.1:{port}"
        code, out, err = sandfleet(["submit", str(path), "--address", address, "--backend",
                                    "fake", "--data-dir", str(tmp_path / "data"), "--json"],
                                   capsys)  # fmt: skip
        assert code == 0, err
        job_id = json.loads(out)["job_id"]
        client = JobSubmissionClient(address)
        final = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
        wait_for(lambda: client.get_job_status(job_id) in final, timeout=300,
                 what="the job to end")  # fmt: skip
        logs = client.get_job_logs(job_id)
        assert client.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-2000:]
        report = json.loads(logs[logs.index("{") :])
        assert report["states"] == {"succeeded": 2}
        code, out, _ = sandfleet(["status", "--data-dir", str(tmp_path / "data"), "--json"],
                                 capsys)  # fmt: skip
        assert json.loads(out)[0]["states"] == {"succeeded": 2}
    finally:
        stop_fleet()
        ray.shutdown()


@pytest.mark.ray
def test_status_and_cancel_reach_the_running_scheduler(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from accounting.policies import load_policies
    from scheduler.fleet import get_scheduler
    from scheduler.testing import flush_ledger, last_states, local_ray, make_plan, state_rows

    plan = make_plan(tmp_path, "held", "demo", ["true"] * 3, backend=Backend.FAKE)
    data = str(tmp_path / "data")
    with local_ray(num_cpus=1, slots=0):  # no sandbox slot: every task stays queued
        try:
            scheduler = get_scheduler(data, policies=load_policies())
            ray.get(scheduler.submit.remote(plan))
            code, out, err = sandfleet(["status", plan.batch_id, "--address", "auto", "--json"],
                                       capsys)  # fmt: skip
            assert code == 0, err
            assert json.loads(out)[0]["states"] == {"queued": 3}
            code, out, err = sandfleet(["cancel", plan.batch_id, "--json"], capsys)
            assert code == 0, err
            assert json.loads(out)["cancelled_queued"] == 3
            code, _, err = sandfleet(["cancel", "no-such-task"], capsys)
            assert code == 1 and "no batch or task 'no-such-task'" in err
            flush_ledger()
            assert set(last_states(state_rows(data, plan.batch_id)).values()) == {"cancelled"}
        finally:
            stop_fleet()


def test_dashboard_host_reaches_the_driver_settings(tmp_path: Path) -> None:
    from scheduler.batch_cli import _settings

    settings = _settings(data_dir=str(tmp_path), dashboard_host="0.0.0.0", no_dashboard=False)
    assert settings.dashboard_host == "0.0.0.0" and settings.dashboard
    assert _settings(data_dir=str(tmp_path)).dashboard_host == "127.0.0.1"
