"""Canary credentials: planted beside the workspace, mounted read-only in HOME, and the
debouncing of their reads — without Docker (the real sandbox is test_sensitive_reads)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError

from accounting.errors import ConfigError
from sandbox.canaries import CANARIES, DEFAULT_CANARIES, load_canaries, plant_canaries
from sandbox.container_spec import HOSTS_FILE, container_spec, sandbox_home
from sandbox.file_watch import FileChange, FileWatcher, WatchRoot
from sandbox.sensitive_watch import AccessDebouncer, credential_patterns, readable_by
from sandbox.templates import Template, load_template


def _workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "attempt" / "repo"
    ws.mkdir(parents=True)
    return ws


def test_default_canaries_are_planted_plausible_agent_readable_and_listed(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    planted = plant_canaries(ws, DEFAULT_CANARIES, "/tmp")
    assert planted is not None and planted.host_dir == tmp_path / "attempt" / "canaries"
    paths = [p for _, p in planted.files]
    assert paths == [
        "/tmp/.aws/credentials", "/tmp/.ssh/id_ed25519", "/tmp/.git-credentials",
        "/tmp/.config/gh/hosts.yml", "/tmp/.docker/config.json", "/tmp/.kube/config",
    ]  # fmt: skip
    texts = {p: Path(h).read_text() for h, p in planted.files}
    assert texts["/tmp/.aws/credentials"].startswith("[default]\naws_access_key_id = AKIA")
    assert "BEGIN OPENSSH PRIVATE KEY" in texts["/tmp/.ssh/id_ed25519"]
    assert "ghp_" in texts["/tmp/.git-credentials"] and "ghp_" in texts["/tmp/.config/gh/hosts.yml"]
    assert json.loads(texts["/tmp/.docker/config.json"])["auths"]
    for host, _ in planted.files:
        assert readable_by(os.stat(host)), host
    if os.geteuid() == 0:
        assert stat.S_IMODE(os.stat(planted.files[0][0]).st_mode) == 0o600
        assert os.stat(planted.host_dir / "home" / ".ssh").st_mode & 0o777 == 0o700
    # two attempts never share a secret
    other = plant_canaries(_workspace(tmp_path / "b"), ["aws"], "/tmp")
    assert other is not None
    assert Path(other.files[0][0]).read_text() != texts["/tmp/.aws/credentials"]
    assert load_canaries(ws) == planted


def test_netrc_is_known_but_opt_in_and_no_names_plant_nothing(tmp_path: Path) -> None:
    assert "netrc" in CANARIES and "netrc" not in DEFAULT_CANARIES
    assert plant_canaries(_workspace(tmp_path), [], "/tmp") is None
    assert load_canaries(tmp_path / "attempt" / "repo") is None


def test_a_home_in_the_workspace_gets_no_canaries(tmp_path: Path) -> None:
    assert plant_canaries(_workspace(tmp_path), DEFAULT_CANARIES, "/workspace/home") is None
    assert plant_canaries(_workspace(tmp_path / "x"), DEFAULT_CANARIES, "/") is None


def test_the_spec_mounts_canaries_read_only_and_keeps_config_writable_for_the_agent(
    tmp_path: Path,
) -> None:
    template = load_template("minimal")
    planted = plant_canaries(_workspace(tmp_path), DEFAULT_CANARIES, sandbox_home(template))
    spec = container_spec(template, image="img", labels={}, workspace_host_path="/w", name="n",
                          canaries=planted)  # fmt: skip
    home = planted.host_dir / "home" if planted else Path()
    binds = {v["bind"]: (k, v["mode"]) for k, v in spec["volumes"].items()}
    assert binds["/tmp/.aws"] == (str(home / ".aws"), "ro")
    assert binds["/tmp/.git-credentials"] == (str(home / ".git-credentials"), "ro")
    assert binds["/tmp/.config/gh"] == (str(home / ".config" / "gh"), "ro")
    assert binds["/workspace"] == ("/w", "rw")
    assert binds["/etc/hosts"] == (str(HOSTS_FILE), "ro")
    assert {m for _, m in binds.values()} == {"ro", "rw"} and len(binds) == 8
    config = spec["tmpfs"]["/tmp/.config"]
    assert "noexec" in config and "uid=10001" in config and "size=" in config
    assert set(spec["tmpfs"]) == {"/tmp", "/tmp/.config"}
    plain = container_spec(template, image="img", labels={}, workspace_host_path="/w", name="n")
    assert set(plain["tmpfs"]) == {"/tmp"} and set(plain["volumes"]) == {"/w", str(HOSTS_FILE)}


def test_the_spec_refuses_canaries_planted_for_another_home(tmp_path: Path) -> None:
    planted = plant_canaries(_workspace(tmp_path), ["aws"], "/tmp")
    with pytest.raises(ValueError, match="sandbox_home"):
        container_spec(load_template("minimal"), image="i", labels={}, workspace_host_path="/w",
                       name="n", env={"HOME": "/tmp/home"}, canaries=planted)  # fmt: skip


def test_canary_paths_under_a_watched_dir_are_known_with_their_parents(tmp_path: Path) -> None:
    planted = plant_canaries(_workspace(tmp_path), ["aws", "gh", "git-credentials"], "/tmp")
    assert planted is not None
    assert planted.known_under("/tmp") == {
        ".aws", ".aws/credentials", ".config", ".config/gh", ".config/gh/hosts.yml",
        ".git-credentials",
    }  # fmt: skip
    assert planted.known_under("/dev/shm") == frozenset()


def test_a_template_defaults_to_canaries_and_refuses_an_unknown_one() -> None:
    base = {"name": "t", "image": "base"}
    assert Template.model_validate(base).canaries == DEFAULT_CANARIES
    assert Template.model_validate({**base, "canaries": []}).canaries == ()
    with pytest.raises(ValidationError, match="unknown canaries"):
        Template.model_validate({**base, "canaries": ["aws", "vault"]})


def test_the_first_access_is_reported_as_a_read_and_repeats_are_absorbed() -> None:
    d = AccessDebouncer(gather_ns=50, repeat_ns=1000)
    d.add(0, "/tmp/.aws/credentials", read=False)  # IN_OPEN
    d.add(1, "/tmp/.aws/credentials", read=True)  # IN_ACCESS
    assert d.next_due_ns() == 50 and d.due(49) == []
    assert d.due(50) == [(0, "read", "/tmp/.aws/credentials")]
    for t in (100, 200, 900):
        d.add(t, "/tmp/.aws/credentials", read=True)
    assert d.due(999) == [] and d.absorbed == 3
    d.add(1000, "/tmp/.aws/credentials", read=False)
    d.add(1010, "/tmp/.kube/config", read=False)
    assert d.drain() == [
        (1000, "open", "/tmp/.aws/credentials"),
        (1010, "open", "/tmp/.kube/config"),
    ]


def test_credential_patterns_are_read_again_only_when_the_policies_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDFLEET_CONFIGS", str(tmp_path))
    policies = tmp_path / "policies.yaml"
    shipped = (Path(__file__).parents[2] / "configs" / "policies.yaml").read_text()
    head = "    action: stop\n    severity: critical\n"
    assert head in shipped
    rule = shipped.replace(head, head + "    credential_patterns: [{}]\n", 1)
    policies.write_text(rule.format("'secret-a'"))
    assert credential_patterns() == ("secret-a",)
    os.utime(policies, ns=(1, 1))
    mtime = policies.stat().st_mtime_ns
    policies.write_text(rule.format("'secret-b'"))  # same size: the time tells them apart
    os.utime(policies, ns=(mtime + 10**9, mtime + 10**9))
    assert credential_patterns() == ("secret-b",)
    policies.write_text("anomalies: [")
    with pytest.raises(ConfigError, match=r"policies\.yaml"):
        credential_patterns()


def test_readable_by_follows_owner_group_and_other_bits(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_text("x")
    os.chmod(f, 0o600)
    st = os.stat(f)
    assert readable_by(st, uid=st.st_uid, gid=-1)
    assert not readable_by(st, uid=st.st_uid + 1, gid=-1)
    os.chmod(f, 0o604)
    assert readable_by(os.stat(f), uid=st.st_uid + 1, gid=-1)


def test_a_fresh_root_does_not_report_what_sandfleet_put_there_but_still_watches_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "tmp"
    (root / ".aws").mkdir(parents=True)
    (root / ".aws" / "credentials").write_text("canary")
    (root / "mine.txt").write_text("agent")
    seen: list[FileChange] = []
    known = frozenset({".aws", ".aws/credentials"})
    watcher = FileWatcher([WatchRoot(str(root), "/tmp", fresh=True, known=known)], seen.append,
                          quiet_s=0.01)  # fmt: skip
    watcher.start()
    (root / ".aws" / "later.txt").write_text("agent")
    watcher.stop()
    assert {(c.op, c.path) for c in seen} == {("create", "/tmp/mine.txt"),
                                              ("create", "/tmp/.aws/later.txt")}  # fmt: skip
