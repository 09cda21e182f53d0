"""Hardening probe, run INSIDE a sandbox as its main command (stdlib only, x86-64).

Prints one JSON object of raw facts; tests/sandbox/test_hardening.py judges them. It never
touches the network beyond a UDP connect() to TEST-NET-1 (192.0.2.1), which sends nothing.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import socket
import stat
import subprocess
import sys
from pathlib import Path

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

# x86-64 syscall numbers and harmless arguments: if the call reaches the kernel it fails
# with EFAULT/EINVAL/EBADF (or succeeds); a seccomp refusal is EPERM (ENOSYS for clone3).
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
SYSCALLS = {
    "unshare": (272, CLONE_NEWUSER | CLONE_NEWNS),
    "mount": (165, 0, 0, 0, 0, 0),
    "umount2": (166, 0, 0),
    "pivot_root": (155, 0, 0),
    "keyctl": (250, 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": (248, 0, 0, 0, 0, 0),
    "request_key": (249, 0, 0, 0, 0),
    "bpf": (321, 0, 0, 0),
    "io_uring_setup": (425, 1, 0),
    "userfaultfd": (323, 1),  # UFFD_USER_MODE_ONLY: allowed unprivileged if reached
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "setns": (308, -1, 0),
    "swapon": (167, 0, 0),
    "kexec_file_load": (320, -1, -1, 0, 0, 0),
}


SOCKETS = ("/var/run/docker.sock", "/run/docker.sock", "/run/containerd/containerd.sock")
FD_RETURNING = {"io_uring_setup", "userfaultfd", "perf_event_open", "bpf"}


def syscall_result(name: str, nr: int, *args: int) -> str:
    ctypes.set_errno(0)
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if ret >= 0:
        if name in FD_RETURNING:
            os.close(ret)
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))


def ptrace_traceme() -> str:
    """PTRACE_TRACEME in a child (reached = 0)."""
    pid = os.fork()
    if pid == 0:
        res = syscall_result("ptrace", 101, 0, 0, 0, 0)
        os._exit(0 if res == "ok" else 100 + getattr(errno, res, 99) % 100)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, str(code))


def proc_status() -> dict[str, str]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def mounts() -> list[dict[str, str]]:
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            parts, rparts = left.split(), right.split()
            rows.append(
                {"point": parts[4], "opts": parts[5], "fstype": rparts[0], "source": rparts[1],
                 "super": rparts[2] if len(rparts) > 2 else ""}
            )  # fmt: skip
    return rows


def can_write(directory: str) -> str:
    path = os.path.join(directory, f".probe-{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    os.close(fd)
    os.unlink(path)
    return "ok"


def can_exec_in(directory: str) -> str:
    path = os.path.join(directory, f"probe-exec-{os.getpid()}.sh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho ran\n")
    os.chmod(path, 0o755)
    try:
        done = subprocess.run([path], capture_output=True, text=True, check=False)
        return "ok" if done.stdout.strip() == "ran" else f"exit {done.returncode}"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    finally:
        os.unlink(path)


def write_file(path: str) -> str:
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def udp_connect() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: route lookup only, no packet
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    finally:
        s.close()
    return "ok"


def loopback() -> dict[str, object]:
    """Names resolved from /etc/hosts, and a TCP round trip over loopback by name."""
    found: dict[str, object] = {}
    for name in ("localhost", socket.gethostname()):
        try:
            found[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, None)})
        except OSError as e:
            found[name] = errno.errorcode.get(e.errno or 0, str(e))
    try:
        with socket.create_server(("localhost", 0)) as server:
            port = server.getsockname()[1]
            with socket.create_connection(("localhost", port), timeout=5) as client:
                peer, _ = server.accept()
                client.sendall(b"ping")
                found["tcp"] = peer.recv(4).decode()
                peer.close()
    except OSError as e:
        found["tcp"] = errno.errorcode.get(e.errno or 0, str(e))
    return found


def rlimit_raise() -> dict[str, str]:
    out = {}
    for name in ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC"):
        res = getattr(resource, name)
        soft, hard = resource.getrlimit(res)
        if hard == resource.RLIM_INFINITY:
            out[name] = "unlimited"
            continue
        try:
            resource.setrlimit(res, (soft, hard + 1))
            out[name] = "ok"
        except (ValueError, OSError) as e:
            out[name] = type(e).__name__
    return out


def setid_files() -> list[str]:
    found = []
    root_dev = os.stat("/").st_dev
    for dirpath, dirnames, filenames in os.walk("/"):
        dirnames[:] = [d for d in dirnames
                       if os.lstat(os.path.join(dirpath, d)).st_dev == root_dev]  # fmt: skip
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                mode = os.lstat(full).st_mode
            except OSError:
                continue
            if stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID):
                found.append(full)
    return found


def fork_loop(limit: int) -> dict[str, object]:
    """Fork children that wait on a pipe until fork fails or `limit` is reached."""
    r, w = os.pipe()
    children, failure = [], None
    try:
        while len(children) < limit:
            try:
                pid = os.fork()
            except OSError as e:
                failure = errno.errorcode.get(e.errno or 0, str(e.errno))
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            children.append(pid)
    finally:
        os.close(w)  # children see EOF and exit
        for pid in children:
            os.waitpid(pid, 0)
        os.close(r)
    return {"forked": len(children), "failure": failure}


def main() -> None:
    fork_limit = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    status = proc_status()
    all_mounts = mounts()
    writable = sorted(
        {m["point"] for m in all_mounts
         if not m["point"].startswith(("/proc", "/sys")) and can_write(m["point"]) == "ok"}
    )  # fmt: skip
    report = {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
        "caps": {k: status.get(k) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": status.get("NoNewPrivs"),
        "seccomp": status.get("Seccomp"),
        "syscalls": {name: syscall_result(name, *call) for name, call in SYSCALLS.items()}
        | {"ptrace": ptrace_traceme()},
        "mounts": all_mounts,
        "writable_mounts": writable,
        "write": {d: can_write(d) for d in ("/", "/etc", "/usr/bin", "/home", "/root", "/var",
                                            "/workspace", "/tmp")},
        "exec": {d: can_exec_in(d) for d in ("/tmp", "/workspace")},
        "docker_socket_paths": [p for p in SOCKETS if os.path.exists(p)],
        "docker_host_env": {k: v for k, v in os.environ.items() if "DOCKER" in k},
        "interfaces": sorted(os.listdir("/sys/class/net")),
        "routes": Path("/proc/net/route").read_text().splitlines()[1:],
        "udp_connect": udp_connect(),
        "net_namespace": os.readlink("/proc/self/ns/net"),
        "loopback": loopback(),
        "proc_sys_write": {p: write_file(p) for p in ("/proc/sys/kernel/hostname",
                                                      "/proc/sys/vm/drop_caches",
                                                      "/proc/sys/kernel/core_pattern")},
        "rlimits": {n: list(resource.getrlimit(getattr(resource, n)))
                    for n in ("RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_NPROC")},
        "rlimit_raise": rlimit_raise(),
        "setid_files": setid_files(),
        "fork_loop": fork_loop(fork_limit) if fork_limit else None,
    }  # fmt: skip
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
