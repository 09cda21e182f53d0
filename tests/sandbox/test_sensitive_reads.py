"""Reads of credential files by a real hardened sandbox (real Docker, real inotify, real
ledger): a canary read is one `file_changed` row with op `read` and the SQL rule finds
it; the canaries are read-only and go with the workspace; a sandbox that runs python,
git, pip and pytest without reaching for them leaves no read and no finding."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until

from accounting.anomalies import run_anomalies
from accounting.policies import load_policies
from accounting.schemas import Event
from accounting.writer import LedgerWriter
from sandbox.activity import ActivityCapture, CaptureIdentity, Record, ledger_sink
from sandbox.attempt import AttemptHooks, AttemptOutcome, AttemptResult, run_attempt_in_sandbox
from sandbox.canaries import canary_dir
from sandbox.templates import load_template
from scheduler.stream_checks import SensitiveFiles

pytestmark = pytest.mark.docker

RULE = load_policies().anomalies.sensitive_files

# The script names no credential path in any argv (the command rule stays out of it):
# only the read can be seen.
PROBE = """set -u
ls -la "$HOME" "$HOME/.aws" "$HOME/.ssh" > /dev/null
stat "$HOME/.kube/config" > /dev/null
for i in 1 2 3; do python3 /workspace/read.py; done
(echo x > "$HOME/.aws/credentials") 2>/dev/null && echo WROTE || echo READONLY
rm -f "$HOME/.git-credentials" 2>/dev/null && echo REMOVED || echo KEPT
mkdir -p "$HOME/.config/tool" && echo ok > "$HOME/.config/tool/settings" && echo CONFIG_OK
python3 /workspace/wait.py
"""
# Holds the sandbox open until the test has seen its writes (then creates `release`).
WAIT = """import os, time
end = time.monotonic() + 60
while not os.path.exists("/workspace/release") and time.monotonic() < end:
    time.sleep(0.02)
"""
READ = """import os
path = os.path.join(os.environ["HOME"], ".a" + "ws", "credentials")
print("read", len(open(path).read()))
"""
# Python, git, pip and pytest going about their business: no canary is read.
CLEAN = """set -eu
python3 -c 'import json, subprocess, ssl, urllib.request; print("py ok")'
echo change >> notes.txt && git diff --stat && git status --short
git add -A && git -c user.name=a -c user.email=a@b commit -qm change && git log --oneline
python3 -m pip --version
python3 -m pytest -q /workspace/test_ok.py
"""


class Capture:
    """Hooks that capture the attempt's activity into a real ledger and a list."""

    def __init__(self, data_dir: Path, identity: CaptureIdentity) -> None:
        self.identity = identity
        self.writer = LedgerWriter(data_dir, node="node-x")
        self.to_ledger = ledger_sink(self.writer)
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.capture: ActivityCapture | None = None
        self.canaries_seen: list[str] = []
        self.workspace: Path | None = None

    def sink(self, batch: list[Record]) -> None:
        with self.lock:
            self.events += [r for r in batch if isinstance(r, Event)]
        self.to_ledger(batch)

    def created(self, cid: str, ws: Path) -> None:
        self.canaries_seen = [str(p) for p in canary_dir(ws).rglob("*")]
        self.workspace = ws
        self.capture = ActivityCapture(cid, ws, self.identity, self.sink, interval=0.5)
        self.capture.start()

    def finished(self, cid: str) -> dict[str, Any]:
        assert self.capture is not None
        self.capture.stop()
        return {}

    def hooks(self, **kw: Any) -> AttemptHooks:
        return AttemptHooks(on_created=self.created, on_finished=self.finished, **kw)

    def files(self, ops: Callable[[str], bool] = lambda op: True) -> list[tuple[str, str]]:
        return [(e.payload["path"], e.payload["op"]) for e in self.events
                if e.kind == "file_changed" and ops(e.payload["op"])]  # fmt: skip


def _given(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "given"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def _run(docker_backend: Any, image: str, template: str, data_dir: Path, batch: str,
         given: Path, cap: Capture, command: list[str],
         repo: bool = False) -> AttemptResult:  # fmt: skip
    where: dict[str, Any] = {"repo": str(given)} if repo else {"workspace_dir": given}
    return run_attempt_in_sandbox(
        docker_backend, load_template(template), data_dir=data_dir, image=image, batch=batch,
        task="t1", command=command, hooks=cap.hooks(), timeout_s=120, **where,
    )  # fmt: skip


def test_a_canary_read_is_recorded_once_the_canaries_are_read_only_and_go_with_the_workspace(
    docker_backend: Any, base_image: str, data_dir: Path, batch_id: str, tmp_path: Path
) -> None:
    cap = Capture(data_dir, CaptureIdentity("ml", batch_id, "t1", 1, "node-x"))
    given = _given(tmp_path, {"probe.sh": PROBE, "read.py": READ, "wait.py": WAIT})
    done: list[AttemptResult] = []
    runner = threading.Thread(target=lambda: done.append(
        _run(docker_backend, base_image, "minimal", data_dir, batch_id, given, cap,
             ["sh", "/workspace/probe.sh"])))  # fmt: skip
    runner.start()
    try:  # the agent's own write in ~/.config is seen: /tmp (and what it holds) is watched
        wait_until(lambda: ("/tmp/.config/tool/settings", "create") in cap.files(),
                   what="the sandbox's write in ~/.config", timeout=60)  # fmt: skip
    finally:
        if cap.workspace is not None:
            (cap.workspace / "release").touch()
        runner.join(120)
        cap.writer.close()
    (result,) = done
    out = (Path(result.archive_dir) / "stdout.log").read_text()
    assert result.outcome is AttemptOutcome.SUCCEEDED, (out, result.error)
    assert out.count("read ") == 3 and "READONLY" in out and "KEPT" in out and "CONFIG_OK" in out
    # three reads in a few seconds: one row; ls and stat read nothing
    assert cap.files(lambda op: op in {"read", "open"}) == [("/tmp/.aws/credentials", "read")]
    # the canaries were there from the start: never reported as the agent's files
    canary_paths = {"/tmp/.aws/", "/tmp/.ssh/", "/tmp/.docker/", "/tmp/.kube/",
                    "/tmp/.git-credentials", "/tmp/.config/", "/tmp/.config/gh/"}  # fmt: skip
    created = {p for p, op in cap.files(lambda op: op not in {"read", "open"})}
    assert not created & canary_paths and not [p for p in created if "credentials" in p]
    # they lived beside the workspace and went with it
    assert any(p.endswith("home/.aws/credentials") for p in cap.canaries_seen)
    assert not (data_dir / "workspaces" / batch_id).exists()
    # the SQL rule finds the read in the ledger
    found, _ = run_anomalies(str(data_dir), load_policies().anomalies, rules=["sensitive_files"],
                             record=False)  # fmt: skip
    by_subject = {f.subject: f for f in found}
    assert set(by_subject) == {  # (stat and rm name theirs in argv: the command rule's)
        "credential_access:/tmp/.aws/credentials", "credential_access:/tmp/.kube/config",
        "credential_access:/tmp/.git-credentials",
    }  # fmt: skip
    finding = by_subject["credential_access:/tmp/.aws/credentials"]
    assert (finding.task, finding.action, finding.severity) == ("t1", "stop", "critical")
    assert finding.detail == "credential access: /tmp/.aws/credentials (file read)"


def test_python_git_pip_and_pytest_read_no_credential_file(
    docker_backend: Any, python_image: str, data_dir: Path, batch_id: str, tmp_path: Path
) -> None:
    cap = Capture(data_dir, CaptureIdentity("ml", batch_id, "t1", 1, "node-x"))
    given = _given(tmp_path, {"clean.sh": CLEAN, "notes.txt": "x\n",
                              "test_ok.py": "def test_ok():\n    assert True\n"})  # fmt: skip
    git = ["git", "-C", str(given), "-c", "user.name=a", "-c", "user.email=a@b"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    try:
        result = _run(docker_backend, python_image, "python", data_dir, batch_id, given, cap,
                      ["sh", "/workspace/clean.sh"], repo=True)  # fmt: skip
    finally:
        cap.writer.close()
    out = (Path(result.archive_dir) / "stdout.log").read_text()
    assert result.outcome is AttemptOutcome.SUCCEEDED, (out, result.error)
    assert "py ok" in out and "1 passed" in out
    assert cap.files(lambda op: op in {"read", "open"}) == []
    assert any(e.kind == "command_started" and e.payload["argv"][:1] == ["git"]
               for e in cap.events)  # fmt: skip
    rule = SensitiveFiles(RULE)
    hits = [h for e in cap.events if e.kind == "file_changed" for h in rule.file(e.time, e.payload)]
    hits += [h for e in cap.events if e.kind == "command_started"
             for h in rule.command(e.time, e.payload["argv"])]  # fmt: skip
    assert hits == []
    found, _ = run_anomalies(str(data_dir), load_policies().anomalies, rules=["sensitive_files"],
                             record=False)  # fmt: skip
    assert found == []


CREDS_IMAGE = """FROM {base}
USER root
RUN mkdir -p /home/dev/.aws /root/.ssh \\
 && echo '[default]' > /home/dev/.aws/credentials && chmod 644 /home/dev/.aws/credentials \\
 && echo key > /root/.ssh/id_ed25519 && chmod 600 /root/.ssh/id_ed25519
"""


def test_an_image_is_searched_once_and_its_readable_credential_files_are_watched_in_each_sandbox(
    docker_client: Any, base_image: str, session_prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    import io

    from sandbox import sensitive_watch
    from sandbox.sensitive_watch import SensitiveWatch, credential_patterns

    walks: list[int] = []
    walk = SensitiveWatch._walk

    def counted(self: SensitiveWatch, root: int, matched: list[str]) -> bool:
        walks.append(root)
        return walk(self, root, matched)

    monkeypatch.setattr(SensitiveWatch, "_walk", counted)
    monkeypatch.setattr(sensitive_watch, "_FOUND", {})  # nothing from earlier tests
    tag = f"sandfleet-test/creds:{session_prefix.lower()}"
    docker_client.images.build(fileobj=io.BytesIO(CREDS_IMAGE.format(base=base_image).encode()),
                               tag=tag, rm=True)  # fmt: skip
    (tmp_path / "extra").mkdir()
    (tmp_path / "tool.py").write_text("print('a file the patterns do not name')\n")
    boxes = []
    try:
        for mounts in (
            {},
            {},
            {str(tmp_path / "tool.py"): {"bind": "/opt/sandfleet/tool.py", "mode": "ro"}},
            {str(tmp_path / "extra"): {"bind": "/home/dev/extra", "mode": "ro"}},
            {str(tmp_path / "extra"): {"bind": "/usr/local", "mode": "ro"}},  # over /usr/local/etc
        ):
            box = docker_client.containers.run(
                tag, ["sleep", "60"], detach=True, network_mode="none", network_disabled=True,
                read_only=True, volumes=mounts, labels={"sandfleet.test": session_prefix},
            )  # fmt: skip
            boxes.append(box)
        seen = []
        for i, box in enumerate(boxes):
            box.reload()
            pid = box.attrs["State"]["Pid"]
            reports: list[Any] = []
            watch = SensitiveWatch(reports.append, None, credential_patterns())
            watch.start()
            try:
                watch.watch_root(pid)
                wait_until(lambda w=watch: bool(w.watched), what=f"box {i}'s credential file")
                # Readable by the agent: watched; root's own key (0600): not.
                assert watch.watched == ["/home/dev/.aws/credentials"]
                assert box.exec_run(["cat", "/home/dev/.aws/credentials"]).exit_code == 0
                wait_until(lambda r=reports: bool(r), what=f"box {i}'s read")
                assert [(r.op, r.path) for r in reports] == [("read", "/home/dev/.aws/credentials")]
            finally:
                watch.stop()
            seen.append(len(walks))
        # The first sandbox's root was searched; the second, of the same image, was not;
        # nor the third, whose one extra file under /opt is not a credential's name. The
        # fourth has a directory mounted under /home, the fifth one over /usr/local/etc:
        # their roots were searched whole.
        assert seen == [1, 1, 1, 2, 3]
    finally:
        for box in boxes:
            box.remove(force=True)
        docker_client.images.remove(tag, force=True)
