"""The project's own seccomp profile (`sandbox/seccomp.json`).

Docker 20.10's compiled-in profile still lets `io_uring_*` through, so every sandbox
gets this one instead, passed as JSON text in `security_opt` (`seccomp=<json>`).

It is an allowlist derived from moby's default profile (moby/profiles
`seccomp/default.json`, Apache-2.0): the same unconditional allow list (361 names, none
of them dangerous), with these changes:

- every capability-conditional allowance is dropped, because sandboxes drop all
  capabilities (so `mount`, `unshare`, `setns`, `bpf`, `perf_event_open`, `ptrace`,
  `chroot`, `reboot`, `*_module`, `syslog`, ... are never allowed);
- `ptrace` and `process_vm_readv/writev` are denied outright (moby allows them on
  kernel >= 4.8);
- `io_uring_*`, `keyctl`, `add_key`, `request_key`, `userfaultfd`, `kexec_*`, ... are
  not listed, as in moby;
- `clone` is allowed only without namespace flags, and `clone3` returns ENOSYS (so libc
  falls back to `clone`), as in moby;
- `socket` is allowed for AF_UNIX, AF_INET, AF_INET6 and AF_NETLINK only (moby allows
  most families); `modify_ldt` is dropped; only x86-64 and arm64 are mapped.

Everything not allowed fails with EPERM.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "DENIED_SYSCALLS",
    "PROFILE_PATH",
    "allowed_syscalls",
    "load_profile",
    "profile_text",
    "security_opt",
]

PROFILE_PATH = Path(__file__).with_name("seccomp.json")

# Calls a sandbox must never reach (the list, plus the rest of what moby denies).
DENIED_SYSCALLS: frozenset[str] = frozenset(
    {
        # namespaces and mounts
        "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
        "fsopen", "fsmount", "fsconfig", "fspick", "move_mount", "open_tree", "mount_setattr",
        # kernel keyring
        "keyctl", "add_key", "request_key",
        # kernel attack surface
        "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "fanotify_init", "lookup_dcookie", "open_by_handle_at",
        # modules, kexec, power, swap, accounting
        "init_module", "finit_module", "delete_module", "create_module", "query_module",
        "get_kernel_syms", "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "acct",
        # other processes
        "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
        "process_madvise",
        # host-wide state
        "settimeofday", "stime", "clock_settime", "clock_settime64", "sethostname",
        "setdomainname", "syslog", "quotactl", "quotactl_fd", "vhangup", "iopl", "ioperm",
        "mbind", "set_mempolicy", "set_mempolicy_home_node", "move_pages", "migrate_pages",
        "lsm_set_self_attr", "modify_ldt",
        # obsolete
        "nfsservctl", "uselib", "ustat", "sysfs", "_sysctl", "vm86", "vm86old",
    }
)  # fmt: skip


@cache
def profile_text() -> str:
    """The profile as compact JSON text, ready for `security_opt=["seccomp=<text>"]`."""
    return json.dumps(load_profile(), separators=(",", ":"), sort_keys=True)


def load_profile() -> dict[str, Any]:
    """The profile as a dict (a fresh copy each call)."""
    data: dict[str, Any] = json.loads(PROFILE_PATH.read_text())
    return data


def security_opt() -> str:
    """The `security_opt` entry that applies the profile."""
    return f"seccomp={profile_text()}"


def allowed_syscalls(
    profile: dict[str, Any] | None = None,
) -> dict[str, list[list[dict[str, Any]]]]:
    """Every name some rule allows -> the argument filters of each such rule ([] = any args)."""
    allowed: dict[str, list[list[dict[str, Any]]]] = {}
    for rule in (profile or load_profile())["syscalls"]:
        if rule["action"] == "SCMP_ACT_ALLOW":
            for name in rule["names"]:
                allowed.setdefault(name, []).append(list(rule.get("args") or []))
    return allowed
