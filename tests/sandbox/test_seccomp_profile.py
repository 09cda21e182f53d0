"""The shipped seccomp profile's content (pure; behaviour is proved in test_hardening.py)."""

from __future__ import annotations

import json

import pytest

from sandbox.seccomp import (
    DENIED_SYSCALLS,
    allowed_syscalls,
    load_profile,
    profile_text,
    security_opt,
)

ISSUE_LIST = {
    "io_uring_setup", "io_uring_enter", "io_uring_register", "unshare", "setns", "mount",
    "umount", "umount2", "pivot_root", "keyctl", "add_key", "request_key", "bpf",
    "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "open_by_handle_at",
    "init_module", "finit_module", "delete_module", "ptrace", "swapon", "swapoff", "reboot",
}  # fmt: skip
CLONE_NAMESPACE_FLAGS = 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET


def test_profile_is_an_allowlist_that_answers_eperm():
    profile = load_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1  # EPERM


def test_every_call_the_issue_lists_is_in_the_denied_set():
    assert ISSUE_LIST <= DENIED_SYSCALLS


@pytest.mark.parametrize("name", sorted(DENIED_SYSCALLS))
def test_denied_call_is_allowed_by_no_rule(name):
    assert name not in allowed_syscalls()


def test_no_rule_depends_on_a_capability_or_kernel_version():
    for rule in load_profile()["syscalls"]:
        for key in ("includes", "excludes"):
            assert set(rule.get(key, {})) <= {"arches"}, rule


def test_clone_is_allowed_only_without_namespace_flags():
    rules = allowed_syscalls()["clone"]
    assert rules == [
        [{"index": 0, "value": CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    ]


def test_clone3_answers_enosys_so_libc_falls_back_to_clone():
    (rule,) = [r for r in load_profile()["syscalls"] if "clone3" in r["names"]]
    assert rule["action"] == "SCMP_ACT_ERRNO"
    assert rule["errnoRet"] == 38


def test_socket_is_allowed_for_unix_inet_inet6_and_netlink_only():
    families = sorted(args[0]["value"] for args in allowed_syscalls()["socket"])
    assert families == [1, 2, 10, 16]


def test_everyday_calls_stay_allowed():
    allowed = allowed_syscalls()
    for name in ("read", "write", "openat", "execve", "fork", "wait4", "mmap", "futex",
                 "arch_prctl", "socketpair", "prlimit64", "seccomp"):  # fmt: skip
        assert name in allowed, name


def test_security_opt_carries_the_profile_as_json_text():
    opt = security_opt()
    assert opt.startswith("seccomp=")
    assert json.loads(opt.removeprefix("seccomp=")) == load_profile()
    assert "\n" not in profile_text()
