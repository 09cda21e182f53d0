"""From inside a real sandbox (base image, `minimal` template), prove the hardening.

One sandbox runs tests/sandbox/probe_script.py, which reports every fact as JSON; each
test below judges one fact. The OOM and timeout tests run their own sandboxes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from sandbox.attempt import AttemptOutcome, run_attempt_in_sandbox
from sandbox.templates import load_template

PROBE = Path(__file__).with_name("probe_script.py")
REFUSED = {"EPERM", "ENOSYS"}  # anything else means the call reached the kernel


@pytest.fixture(scope="module")
def report(docker_backend, base_image, tmp_path_factory, session_prefix) -> dict:
    template = load_template("minimal")
    given = tmp_path_factory.mktemp("probe")
    shutil.copy(PROBE, given / "probe_script.py")
    data_dir = tmp_path_factory.mktemp("data")
    fork_cap = template.resources.pids + 64  # the loop must stop before this
    result = run_attempt_in_sandbox(
        docker_backend, template, data_dir=data_dir, image=base_image,
        batch=f"{session_prefix}-probe", task="probe", workspace_dir=given, timeout_s=120,
        command=["python3", "/workspace/probe_script.py", str(fork_cap)],
    )  # fmt: skip
    archive = Path(result.archive_dir)
    assert result.exit_code == 0, (archive / "stderr.log").read_text()
    facts = json.loads((archive / "stdout.log").read_text())
    facts["_pids_limit"] = template.resources.pids
    facts["_fork_cap"] = fork_cap
    return facts


def test_sandbox_user_is_not_root(report):
    assert report["uid"] == report["euid"] == 10001
    assert report["gid"] == 10001
    assert 0 not in report["groups"]


@pytest.mark.parametrize("capset", ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"])
def test_capability_set_is_empty(report, capset):
    assert int(report["caps"][capset], 16) == 0


def test_no_new_privileges_is_set(report):
    assert report["no_new_privs"] == "1"


def test_seccomp_is_in_filter_mode(report):
    assert report["seccomp"] == "2"


@pytest.mark.parametrize(
    "call",
    ["unshare", "mount", "umount2", "pivot_root", "keyctl", "add_key", "request_key", "bpf",
     "io_uring_setup", "userfaultfd", "perf_event_open", "setns", "ptrace"],
)  # fmt: skip
def test_dangerous_syscall_is_refused(report, call):
    assert report["syscalls"][call] in REFUSED


def test_root_filesystem_is_read_only(report):
    (root,) = [m for m in report["mounts"] if m["point"] == "/"]
    assert root["opts"].split(",")[0] == "ro"
    for path in ("/", "/etc", "/usr/bin", "/home", "/var"):
        assert report["write"][path] == "EROFS", path


def test_only_workspace_and_tmp_are_writable_besides_private_ipc(report):
    # /dev/shm and /dev/mqueue belong to the sandbox's private IPC namespace (noexec);
    # /tmp/.config (HOME's, beside the canary credentials) is a second, agent-owned /tmp.
    tmps = {"/tmp", "/tmp/.config", "/dev/shm", "/dev/mqueue"}
    assert set(report["writable_mounts"]) <= {"/workspace", *tmps}
    assert {"/workspace", "/tmp"} <= set(report["writable_mounts"])
    for mount in report["mounts"]:
        if mount["point"] in tmps:
            assert "noexec" in mount["opts"].split(","), mount


def test_tmp_is_noexec_and_workspace_is_not(report):
    assert report["exec"]["/tmp"] == "EACCES"
    assert report["exec"]["/workspace"] == "ok"


def test_tmp_is_sized_by_the_template(report):
    (tmp,) = [m for m in report["mounts"] if m["point"] == "/tmp"]
    size_kib = load_template("minimal").resources.tmp_size // 1024
    assert f"size={size_kib}k" in tmp["super"]


def test_no_docker_socket_is_reachable(report):
    assert report["docker_socket_paths"] == []
    assert report["docker_host_env"] == {}
    for mount in report["mounts"]:
        assert "docker.sock" not in mount["point"] and "containerd" not in mount["point"]


def test_only_loopback_and_no_route(report):
    assert report["interfaces"] == ["lo"]
    assert report["routes"] == []
    assert report["udp_connect"] == "ENETUNREACH"


def test_a_network_namespace_of_its_own_where_localhost_works(report):
    assert report["net_namespace"] != os.readlink("/proc/self/ns/net")  # not the host's
    assert report["loopback"] == {
        "localhost": ["127.0.0.1", "::1"], "sandbox": ["127.0.1.1"], "tcp": "ping",
    }  # fmt: skip


def test_proc_sys_is_read_only(report):
    (mount,) = [m for m in report["mounts"] if m["point"] == "/proc/sys"]
    assert mount["opts"].split(",")[0] == "ro"
    assert set(report["proc_sys_write"].values()) <= {"EROFS", "EACCES"}


def test_rlimits_are_set_and_cannot_be_raised(report):
    nofile = load_template("minimal").resources.nofile
    assert report["rlimits"]["RLIMIT_NOFILE"] == [nofile, nofile]
    assert report["rlimits"]["RLIMIT_CORE"] == [0, 0]
    assert report["rlimit_raise"]["RLIMIT_NOFILE"] == "ValueError"
    assert report["rlimit_raise"]["RLIMIT_CORE"] == "ValueError"


def test_no_setuid_or_setgid_binaries(report):
    assert report["setid_files"] == []


def test_a_bounded_fork_loop_stops_at_the_pids_limit(report):
    loop = report["fork_loop"]
    assert loop["failure"] == "EAGAIN"
    assert loop["forked"] < report["_pids_limit"] < report["_fork_cap"]


def test_a_memory_hog_is_killed_and_reported_oom(docker_backend, base_image, data_dir, batch_id):
    hog = "x = []\nwhile True: x.append(bytearray(32 * 2**20))"
    result = run_attempt_in_sandbox(
        docker_backend, load_template("minimal"), data_dir=data_dir, image=base_image,
        batch=batch_id, task="hog", command=["python3", "-c", hog], timeout_s=120,
    )  # fmt: skip
    assert result.oom is True
    assert result.outcome is AttemptOutcome.OOM
    assert result.exit_code == 137
    assert result.timed_out is False


def test_oom_of_a_child_is_reported_even_when_the_parent_exits_zero(
    docker_backend, base_image, data_dir, batch_id
):
    script = "python3 -c 'bytearray(2**30)'; echo parent survived"
    result = run_attempt_in_sandbox(
        docker_backend, load_template("minimal"), data_dir=data_dir, image=base_image,
        batch=batch_id, task="child-hog", command=["sh", "-c", script], timeout_s=120,
    )  # fmt: skip
    assert result.exit_code == 0
    assert result.oom is True
    assert result.outcome is AttemptOutcome.OOM


def test_a_sleeper_is_killed_at_its_timeout_and_reported(
    docker_backend, base_image, data_dir, batch_id
):
    result = run_attempt_in_sandbox(
        docker_backend, load_template("minimal"), data_dir=data_dir, image=base_image,
        batch=batch_id, task="sleeper", command=["sleep", "600"], timeout_s=2,
    )  # fmt: skip
    assert result.timed_out is True
    assert result.outcome is AttemptOutcome.TIMEOUT
    assert result.exit_code == 137
    assert result.oom is False
