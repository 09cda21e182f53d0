"""The container plan is a pure function: every hardening flag, from the template."""

from __future__ import annotations

import re

import pytest

from sandbox.backend import SandboxSpec
from sandbox.container_spec import (
    HOSTNAME,
    HOSTS_FILE,
    container_spec,
    sandbox_labels,
    sandbox_name,
)
from sandbox.seccomp import security_opt
from sandbox.templates import Template, load_template


def make(template: Template | None = None, **overrides):
    t = template or load_template("minimal")
    kwargs = dict(
        image="sandfleet/base:abc",
        labels=sandbox_labels(batch="b1", task="t1", attempt=2, team="ml", owner="h:1:2"),
        workspace_host_path="/data/workspaces/b1/t1/2/repo",
        name="sf-b1-t1-a2-x",
    )
    kwargs.update(overrides)
    return container_spec(t, **kwargs)


def test_sandbox_runs_as_uid_10001_with_no_capabilities_and_no_new_privileges():
    spec = make()
    assert spec["user"] == "10001:10001"
    assert spec["cap_drop"] == ["ALL"]
    assert "cap_add" not in spec
    assert spec["privileged"] is False
    assert "no-new-privileges:true" in spec["security_opt"]


def test_sandbox_gets_the_projects_seccomp_profile():
    assert security_opt() in make()["security_opt"]


def test_root_is_read_only_and_tmp_is_a_sized_noexec_tmpfs():
    t = load_template("minimal")
    spec = make(t)
    assert spec["read_only"] is True
    assert spec["tmpfs"] == {"/tmp": f"rw,noexec,nosuid,nodev,size={t.resources.tmp_size}"}


def test_workspace_is_the_only_writable_bind_mount_beside_the_read_only_hosts_file():
    spec = make()
    assert spec["volumes"] == {
        "/data/workspaces/b1/t1/2/repo": {"bind": "/workspace", "mode": "rw"},
        str(HOSTS_FILE): {"bind": "/etc/hosts", "mode": "ro"},
    }
    assert spec["working_dir"] == "/workspace"
    assert "mounts" not in spec


def test_no_network_no_ports_no_devices_no_docker_socket():
    spec = make()
    assert spec["network_mode"] == "none"
    assert spec["network_disabled"] is True  # no network sandbox in the engine either
    for key in ("ports", "devices", "device_requests", "network", "links", "dns"):
        assert key not in spec
    assert not any("docker.sock" in path for path in spec["volumes"])


def test_namespaces_are_private_and_an_init_process_reaps_zombies():
    spec = make()
    assert spec["ipc_mode"] == "private"
    assert spec["cgroupns"] == "private"
    assert spec["init"] is True
    for key in ("pid_mode", "userns_mode", "uts_mode"):
        assert key not in spec


def test_limits_come_from_the_template_and_swap_equals_memory():
    t = load_template("python")
    spec = make(t)
    r = t.resources
    assert spec["pids_limit"] == r.pids
    assert spec["mem_limit"] == r.memory
    assert spec["memswap_limit"] == r.memory
    assert spec["nano_cpus"] == int(r.cpus * 1e9)
    assert {"Name": "nofile", "Soft": r.nofile, "Hard": r.nofile} in spec["ulimits"]
    assert {"Name": "core", "Soft": 0, "Hard": 0} in spec["ulimits"]


def test_logs_kept_by_the_engine_are_capped():
    assert make()["log_config"]["config"]["max-size"]


def test_labels_name_the_batch_task_attempt_team_and_owner():
    labels = make()["labels"]
    assert labels == {
        "sandfleet.managed": "1",
        "sandfleet.batch": "b1",
        "sandfleet.task": "t1",
        "sandfleet.attempt": "2",
        "sandfleet.team": "ml",
        "sandfleet.owner": "h:1:2",
    }


def test_command_defaults_to_the_templates_agent_command():
    t = load_template("minimal")
    assert make(t)["command"] == list(t.agent_command)
    assert make(t, command=["pytest", "-q"])["command"] == ["pytest", "-q"]


def test_env_layers_caller_over_template_and_home_is_tmp():
    t = load_template("python")
    env = make(t, env={"EXTRA": "1"})["environment"]
    assert env["HOME"] == "/tmp"
    assert env["EXTRA"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"


def test_runc_uses_the_engine_default_and_runsc_is_named():
    assert "runtime" not in make()
    t = load_template("minimal").model_copy(update={"runtime": "runsc"})
    assert make(t)["runtime"] == "runsc"


def test_spec_is_a_pure_function_of_its_inputs():
    assert make() == make()


def test_sandbox_name_is_a_valid_container_name():
    name = sandbox_name("batch/../x", "task with spaces", 3, "ab12")
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+", name)


def test_sandbox_spec_is_read_only_and_needs_image_name_and_labels():
    spec = SandboxSpec(make())
    with pytest.raises(TypeError):
        spec.kwargs["user"] = "root"  # type: ignore[index]
    assert spec.create_kwargs()["user"] == "10001:10001"
    with pytest.raises(ValueError, match="image"):
        SandboxSpec({"name": "x", "labels": {}})


def test_the_hosts_file_names_localhost_and_the_sandbox_hostname():
    spec = make()
    names: dict[str, list[str]] = {}
    for line in HOSTS_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            address, *aliases = line.split()
            for alias in aliases:
                names.setdefault(alias, []).append(address)
    assert names["localhost"] == ["127.0.0.1", "::1"]
    assert names[spec["hostname"]] == names[HOSTNAME] == ["127.0.1.1"]
    assert HOSTS_FILE.stat().st_mode & 0o004  # the agent (uid 10001) reads it
