"""The hardened container plan: a pure function of (template, task identity, paths).

`container_spec()` returns the docker SDK `containers.create` kwargs of one sandbox;
nothing here talks to an engine. Every sandbox gets: uid 10001, no capabilities,
no-new-privileges, the project's seccomp profile, a read-only root, a sized noexec
`/tmp`, no network (a network namespace of its own holding only loopback, made by the
runtime without the engine's network stack: see `NETWORK`), limits on pids / memory
(swap = memory) / cpus / open files, no core dumps, a private IPC namespace and cgroup
namespace, an init process, and the `sandfleet.*` labels that let the reaper find it;
with `canaries`, fake credential files read-only in HOME (`sandbox.canaries`). Never
privileged, never a device, a port or the Docker socket.
"""

from __future__ import annotations

import functools
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sandbox.canaries import CanarySet
from sandbox.seccomp import security_opt
from sandbox.templates import Template

__all__ = [
    "AGENT_UID",
    "HOSTNAME",
    "HOSTS_FILE",
    "LABEL_ATTEMPT",
    "LABEL_BATCH",
    "LABEL_MANAGED",
    "LABEL_OWNER",
    "LABEL_TASK",
    "LABEL_TEAM",
    "LABEL_TEMPLATE",
    "LOG_MAX_SIZE",
    "NETWORK",
    "TMP_MOUNT",
    "WORKSPACE_MOUNT",
    "container_spec",
    "sandbox_home",
    "sandbox_labels",
    "sandbox_name",
]

AGENT_UID = 10001
TMP_MOUNT = "/tmp"  # noqa: S108 - the sandbox's own tmpfs, not the host's /tmp
WORKSPACE_MOUNT = "/workspace"
LOG_MAX_SIZE = "64m"  # per stream file kept by the engine; bounds a runaway `yes`
HOSTNAME = "sandbox"
HOSTS_FILE = Path(__file__).parent / "etc" / "hosts"  # localhost, and HOSTNAME

# No network: `network_mode: none` with the container's networking disabled. runc still
# gives the sandbox a network namespace of its own, holding only loopback, but the
# engine sets up no network sandbox for it: with `none` alone, dockerd builds one per
# container and runc re-executes the whole dockerd binary as a prestart hook to join it
# (`libnetwork-setkey`), about half the CPU of a container's start and removal on this
# machine (bench/sandbox_start.py). Disabled networking also writes no /etc/hosts or
# /etc/resolv.conf: the project's `HOSTS_FILE` is mounted read-only (localhost resolves
# as before), and there is no resolver to ask, as there is nothing to reach.
NETWORK: dict[str, Any] = {"network_mode": "none", "network_disabled": True}

LABEL_MANAGED = "sandfleet.managed"
LABEL_BATCH = "sandfleet.batch"
LABEL_TASK = "sandfleet.task"
LABEL_ATTEMPT = "sandfleet.attempt"
LABEL_TEAM = "sandfleet.team"
LABEL_OWNER = "sandfleet.owner"
LABEL_TEMPLATE = "sandfleet.template"

_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def sandbox_labels(
    *, batch: str, task: str, attempt: int, team: str, owner: str, template: str = ""
) -> dict[str, str]:
    """The labels every sandfleet container carries."""
    labels = {
        LABEL_MANAGED: "1",
        LABEL_BATCH: batch,
        LABEL_TASK: task,
        LABEL_ATTEMPT: str(attempt),
        LABEL_TEAM: team,
        LABEL_OWNER: owner,
    }
    if template:
        labels[LABEL_TEMPLATE] = template
    return labels


def sandbox_name(batch: str, task: str, attempt: int, nonce: str) -> str:
    """A valid, unique container name: `sf-<batch>-<task>-a<attempt>-<nonce>`."""
    raw = f"sf-{batch}-{task}-a{attempt}-{nonce}"
    return _NAME_UNSAFE.sub("_", raw)[:200]


def sandbox_home(template: Template, env: Mapping[str, str] | None = None) -> str:
    """The agent's HOME in a sandbox made with this `env`: /tmp unless the template or
    `env` says otherwise (the root filesystem is read-only)."""
    return _environment(template, env)["HOME"]


def _environment(template: Template, env: Mapping[str, str] | None) -> dict[str, str]:
    return {"HOME": TMP_MOUNT, **template.env, **(env or {})}


@functools.cache
def _hosts_file() -> str:
    """`HOSTS_FILE`, once it is known the agent (not its owner) may read it."""
    if not HOSTS_FILE.stat().st_mode & stat.S_IROTH:
        raise ValueError(
            f"{HOSTS_FILE} is not readable by the sandbox's user (a checkout made under a "
            f"strict umask?); fix: chmod 644 {HOSTS_FILE}"
        )
    return str(HOSTS_FILE)


def container_spec(
    template: Template,
    *,
    image: str,
    labels: Mapping[str, str],
    workspace_host_path: str,
    name: str,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    canaries: CanarySet | None = None,
) -> dict[str, Any]:
    """The docker SDK `containers.create` kwargs of one hardened sandbox.

    `command` defaults to the template's agent command; `env` is layered over the
    template's env (HOME is /tmp: the root filesystem is read-only). `canaries` (planted
    by `sandbox.canaries.plant_canaries` for this HOME) are mounted read-only in HOME; a
    directory holding one that is not HOME itself (`~/.config`) becomes a tmpfs owned by
    the agent, sized and flagged as /tmp.
    """
    res = template.resources
    argv = list(command) if command else list(template.agent_command)
    if not argv:
        raise ValueError("a sandbox needs a command")
    environment = _environment(template, env)
    if canaries is not None and canaries.home != environment["HOME"].rstrip("/"):
        raise ValueError(
            f"the canaries were planted for HOME {canaries.home}, the sandbox's is "
            f"{environment['HOME']} (fix: plant them with sandbox_home(template, env))"
        )
    tmp_opts = f"rw,noexec,nosuid,nodev,size={res.tmp_size}"
    spec: dict[str, Any] = {
        "image": image,
        "command": argv,
        "name": name,
        "labels": dict(labels),
        "hostname": HOSTNAME,
        "user": f"{AGENT_UID}:{AGENT_UID}",
        "working_dir": WORKSPACE_MOUNT,
        "environment": environment,
        # privileges
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", security_opt()],
        # filesystem
        "read_only": True,
        "tmpfs": {TMP_MOUNT: tmp_opts},
        "volumes": {
            workspace_host_path: {"bind": WORKSPACE_MOUNT, "mode": "rw"},
            _hosts_file(): {"bind": "/etc/hosts", "mode": "ro"},
        },
        # network and namespaces
        **NETWORK,
        "ipc_mode": "private",
        "cgroupns": "private",
        "init": True,
        # limits
        "pids_limit": res.pids,
        "mem_limit": res.memory,
        "memswap_limit": res.memory,
        "nano_cpus": round(res.cpus * 1e9),
        "ulimits": [
            {"Name": "nofile", "Soft": res.nofile, "Hard": res.nofile},
            {"Name": "core", "Soft": 0, "Hard": 0},
        ],
        "log_config": {"type": "json-file", "config": {"max-size": LOG_MAX_SIZE, "max-file": "1"}},
        # I/O: no tty (keeps stdout and stderr apart), no stdin
        "tty": False,
        "stdin_open": False,
    }
    if canaries is not None:
        owned = f"{tmp_opts},uid={AGENT_UID},gid={AGENT_UID},mode=0700"
        spec["tmpfs"].update({d: owned for d in canaries.tmpfs_dirs()})
        spec["volumes"].update(canaries.mounts())
    if template.runtime != "runc":
        spec["runtime"] = template.runtime
    return spec
