"""One attempt end to end: archive, diff, outcome, and nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from accounting.errors import BudgetError, ImageError, SandboxError
from sandbox.attempt import AttemptHooks, AttemptOutcome, run_attempt_in_sandbox
from sandbox.fake_backend import FakeBackend, FakeRun


@pytest.fixture
def given(tmp_path: Path) -> Path:
    d = tmp_path / "given"
    d.mkdir()
    (d / "a.txt").write_text("old\n")
    return d


def run(backend, template, data_dir, image, batch, **kwargs):
    return run_attempt_in_sandbox(
        backend, template, data_dir=data_dir, image=image, batch=batch, task="t1", **kwargs
    )


def assert_nothing_left(backend, data_dir: Path, batch: str) -> None:
    assert backend.list({"sandfleet.batch": batch}) == []
    assert not (data_dir / "workspaces" / batch).exists()


def test_a_successful_attempt_is_archived_and_cleaned_up(minimal, data_dir, batch_id, given):
    backend = FakeBackend()
    result = run(backend, minimal, data_dir, "img", batch_id, workspace_dir=given,
                 command=["sh", "-c", "echo hi; echo new > b.txt"])  # fmt: skip
    archive = Path(result.archive_dir)
    assert archive == data_dir / "archive" / batch_id / "t1" / "1"
    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert (archive / "stdout.log").read_bytes() == b"hi\n"
    assert (archive / "stderr.log").read_bytes() == b""
    assert b"+new" in (archive / "diff.patch").read_bytes()
    saved = json.loads((archive / "result.json").read_text())
    assert saved["outcome"] == "succeeded"
    assert saved["diff_sha256"] == result.diff_sha256
    assert_nothing_left(backend, data_dir, batch_id)


def test_failure_oom_and_timeout_are_outcomes_not_exceptions(minimal, data_dir, batch_id):
    backend = FakeBackend()
    cases = {
        AttemptOutcome.FAILED: ["sh", "-c", "exit 2"],
        AttemptOutcome.OOM: ["sandfleet-fake-oom"],
        AttemptOutcome.TIMEOUT: ["sleep", "100"],
    }
    for attempt, (outcome, command) in enumerate(cases.items(), start=1):
        result = run(backend, minimal, data_dir, "img", batch_id, attempt=attempt,
                     command=command, timeout_s=5)  # fmt: skip
        assert result.outcome is outcome
    assert_nothing_left(backend, data_dir, batch_id)


def test_output_lines_are_streamed_to_the_callback(minimal, data_dir, batch_id):
    seen = []
    backend = FakeBackend(run=lambda spec: FakeRun(stdout=b"a\nb\npartial", stderr=b"e\n"))
    run(backend, minimal, data_dir, "img", batch_id, on_output=lambda *x: seen.append(x))
    assert [x for x in seen if x[0] == "stdout"] == [
        ("stdout", "a"),
        ("stdout", "b"),
        ("stdout", "partial"),
    ]
    assert ("stderr", "e") in seen


def test_a_missing_image_raises_after_recording_the_error_and_cleaning_up(
    minimal, data_dir, batch_id, given
):
    backend = FakeBackend(images={"other"})
    with pytest.raises(ImageError, match="sandfleet images build"):
        run(backend, minimal, data_dir, "missing:1", batch_id, workspace_dir=given)
    saved = json.loads((data_dir / "archive" / batch_id / "t1" / "1" / "result.json").read_text())
    assert saved["outcome"] == "error"
    assert "sandfleet images build" in saved["error"]
    assert_nothing_left(backend, data_dir, batch_id)


def test_diff_of_an_edit_and_a_new_file_is_collected_from_a_real_sandbox(
    docker_backend, base_image, minimal, data_dir, batch_id, given
):
    script = "echo edit >> a.txt && mkdir -p d && echo n > d/new.txt"
    result = run(docker_backend, minimal, data_dir, base_image, batch_id, workspace_dir=given,
                 command=["sh", "-c", script])  # fmt: skip
    assert result.outcome is AttemptOutcome.SUCCEEDED, result
    patch = (Path(result.archive_dir) / "diff.patch").read_text()
    assert "+edit" in patch
    assert "new file mode" in patch and "b/d/new.txt" in patch
    assert (result.files_changed, result.insertions, result.deletions) == (2, 2, 0)
    assert_nothing_left(docker_backend, data_dir, batch_id)


def test_a_repo_at_a_ref_is_what_the_real_sandbox_sees(
    docker_backend, base_image, minimal, data_dir, batch_id, tmp_path
):
    import subprocess

    repo = tmp_path / "r"
    repo.mkdir()
    env = ["-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "-C", str(repo), "init", "-q", "-b", "main"], check=True)
    (repo / "v.txt").write_text("1\n")
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), *env, "commit", "-qm", "c1"], check=True)
    subprocess.run(["git", "-C", str(repo), "tag", "first"], check=True)
    (repo / "v.txt").write_text("2\n")
    subprocess.run(["git", "-C", str(repo), *env, "commit", "-qam", "c2"], check=True)
    script = "cat v.txt; git status --short; git log --oneline"
    result = run(docker_backend, minimal, data_dir, base_image, batch_id, repo=str(repo),
                 ref="first", command=["sh", "-c", script])  # fmt: skip
    out = (Path(result.archive_dir) / "stdout.log").read_text()
    assert result.exit_code == 0, (Path(result.archive_dir) / "stderr.log").read_text()
    assert out.splitlines()[0] == "1"
    assert "c1" in out and "c2" not in out
    assert_nothing_left(docker_backend, data_dir, batch_id)


def _status(backend, sandbox_id):
    return next(b.status.value for b in backend.list({}) if b.id == sandbox_id)


def test_hooks_add_mounts_env_and_a_wrapper_and_watch_from_create_to_exit(
    minimal, data_dir, batch_id, given
):
    specs, calls = [], []
    backend = FakeBackend(run=lambda spec: specs.append(spec) or FakeRun(exit_code=3))
    hooks = AttemptHooks(
        volumes={"/host/gw": {"bind": "/run/sandfleet", "mode": "rw"}},
        env={"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1"},
        wrap_command=lambda argv: ("fwd", "--", *argv),
        on_created=lambda cid, ws: calls.append(("created", _status(backend, cid), ws.name)),
        on_finished=lambda cid: calls.append(("finished", _status(backend, cid))) or {"n": 1},
    )
    result = run(backend, minimal, data_dir, "img", batch_id, workspace_dir=given,
                 command=["agent", "go"], env={"OPENAI_BASE_URL": "x", "K": "v"},
                 hooks=hooks)  # fmt: skip
    kwargs = specs[0].kwargs
    assert kwargs["command"] == ["fwd", "--", "agent", "go"]
    assert result.command == ("agent", "go")  # the agent's argv, as asked
    assert kwargs["volumes"]["/host/gw"] == {"bind": "/run/sandfleet", "mode": "ro"}  # forced
    assert any(v["bind"] == "/workspace" for v in kwargs["volumes"].values())
    assert kwargs["environment"]["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/v1"  # node wins
    assert kwargs["environment"]["K"] == "v"
    assert calls == [("created", "created", "repo"), ("finished", "exited")]
    assert result.outcome is AttemptOutcome.FAILED and result.node_report == {"n": 1}
    saved = json.loads((Path(result.archive_dir) / "result.json").read_text())
    assert saved["node_report"] == {"n": 1}
    assert_nothing_left(backend, data_dir, batch_id)


def test_the_capture_stops_after_exit_before_the_sandbox_and_the_workspace_go(
    minimal, data_dir, batch_id, given
):
    seen = []
    backend = FakeBackend()

    def finished(cid):
        ws = data_dir / "workspaces" / batch_id / "t1" / "1" / "repo"
        seen.append((_status(backend, cid), (ws / "b.txt").read_text()))
        return {"n": 1}

    hooks = AttemptHooks(on_created=lambda cid, ws: None, on_finished=finished)
    result = run(backend, minimal, data_dir, "img", batch_id, workspace_dir=given,
                 command=["sh", "-c", "echo new > b.txt"], hooks=hooks)  # fmt: skip
    assert seen == [("exited", "new\n")]
    assert result.node_report == {"n": 1} and result.files_changed == 1
    assert b"+new" in (Path(result.archive_dir) / "diff.patch").read_bytes()
    assert_nothing_left(backend, data_dir, batch_id)


def test_an_empty_workspace_left_empty_is_an_empty_diff(minimal, data_dir, batch_id):
    result = run(FakeBackend(), minimal, data_dir, "img", batch_id, command=["true"])
    assert result.outcome is AttemptOutcome.SUCCEEDED
    assert (result.files_changed, result.diff_bytes) == (0, 0)
    assert (Path(result.archive_dir) / "diff.patch").read_bytes() == b""


def test_a_sandbox_the_node_stopped_for_budget_is_budget_exceeded(minimal, data_dir, batch_id):
    backend = FakeBackend(run=lambda spec: FakeRun(exit_code=137))
    hooks = AttemptHooks(
        on_created=lambda cid, ws: None,
        on_finished=lambda cid: {"stop_reason": "budget_exceeded", "stop_detail": "task cap"},
    )
    result = run(backend, minimal, data_dir, "img", batch_id, hooks=hooks)
    assert result.outcome is AttemptOutcome.BUDGET_EXCEEDED and result.exit_code == 137
    assert_nothing_left(backend, data_dir, batch_id)


def test_a_failing_on_created_is_an_error_and_nothing_is_left(minimal, data_dir, batch_id):
    finished = []

    def refuse(cid, ws):
        raise BudgetError("the task's budget is spent")

    backend = FakeBackend()
    hooks = AttemptHooks(on_created=refuse, on_finished=finished.append)
    with pytest.raises(BudgetError, match="budget is spent"):
        run(backend, minimal, data_dir, "img", batch_id, hooks=hooks)
    assert finished == []  # capture never started: nothing to stop
    saved = json.loads((data_dir / "archive" / batch_id / "t1" / "1" / "result.json").read_text())
    assert saved["outcome"] == "error"
    assert_nothing_left(backend, data_dir, batch_id)


def test_a_failing_on_finished_still_removes_the_sandbox_and_says_why(minimal, data_dir, batch_id):
    def broken(cid):
        raise RuntimeError("node gateway gone")

    backend = FakeBackend()
    hooks = AttemptHooks(on_created=lambda cid, ws: None, on_finished=broken)
    with pytest.raises(SandboxError, match="node gateway gone"):
        run(backend, minimal, data_dir, "img", batch_id, hooks=hooks)
    assert_nothing_left(backend, data_dir, batch_id)
