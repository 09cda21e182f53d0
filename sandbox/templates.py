"""Templates: what a sandbox is made of — image, limits, network allowlist, agent command.

`configs/templates/<name>.yaml` is loaded into a `Template`; a bad file gets an error
naming the file, the field and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from accounting.config import configs_dir, load_model
from accounting.errors import ConfigError
from accounting.units import Bytes, parse_bytes
from sandbox.canaries import CANARIES, DEFAULT_CANARIES

__all__ = [
    "Resources",
    "Template",
    "list_templates",
    "load_template",
    "templates_dir",
]

_HOST = re.compile(
    r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*(:\d{1,5})?$"
)
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


class Resources(BaseModel):
    """Limits applied to every sandbox made from the template."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(1.0, gt=0, le=64, description="CPU cores (CFS quota); also Ray's num_cpus.")
    memory: Bytes = Field(
        parse_bytes("1g"), description="Memory limit; swap is set equal (no swap)."
    )
    pids: int = Field(256, ge=16, le=32768, description="Maximum number of processes and threads.")
    tmp_size: Bytes = Field(parse_bytes("256m"), description="Size of the /tmp tmpfs (noexec).")
    workspace_size: Bytes = Field(
        parse_bytes("1g"), description="Size cap of /workspace (a tmpfs on the host when root)."
    )
    nofile: int = Field(4096, ge=64, le=1048576, description="Open-file limit (soft = hard).")


class Template(BaseModel):
    """One sandbox template (`configs/templates/<name>.yaml`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Template name; must equal the file's stem.")
    description: str = Field("", description="One line for `sandfleet templates list`.")
    image: str = Field(
        description="Image recipe under configs/images/ (`base` is the Debian rootfs image)."
    )
    resources: Resources = Field(Resources(), description="Limits.")
    timeout: int = Field(600, gt=0, le=7 * 24 * 3600, description="Default timeout, seconds.")
    network_allowlist: tuple[str, ...] = Field(
        (),
        description="Hosts (host or host:port, `*.` wildcard) the gateway may reach; empty = none.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment of the agent.")
    agent_command: tuple[str, ...] = Field(
        ("sh", "-c", "echo no agent configured"),
        description="argv of the agent, run in /workspace.",
    )
    warm_pool: int = Field(
        0, description="Reserved: pre-created containers per node are not built; only 0."
    )
    runtime: Literal["runc", "runsc"] = Field("runc", description="OCI runtime; runsc = gVisor.")
    canaries: tuple[str, ...] = Field(
        DEFAULT_CANARIES,
        description="Fake credential files planted read-only in HOME, whose reads are "
        f"recorded (sandbox.canaries); of: {', '.join(CANARIES)}. [] = none.",
    )

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use lowercase letters, digits and dashes, starting with a letter")
        return v

    @field_validator("network_allowlist")
    @classmethod
    def _hosts_are_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for host in v:
            if not _HOST.match(host.lower()):
                raise ValueError(f"{host!r} is not a host name; write it like api.openai.com:443")
        return tuple(h.lower() for h in v)

    @field_validator("env")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise ValueError(f"{key!r} is not an environment variable name")
        return v

    @field_validator("warm_pool", mode="before")
    @classmethod
    def _no_warm_pool(cls, v: object) -> object:
        if v not in (0, None):
            raise ValueError(
                "warm pools are not built: every sandbox starts cold (~90 ms from request to "
                "command on a 2-core machine, bench/sandbox_start.py); set warm_pool: 0 or "
                "leave it out"
            )
        return 0

    @field_validator("canaries")
    @classmethod
    def _known_canaries(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in v if name not in CANARIES]
        if unknown:
            raise ValueError(
                f"unknown canaries {unknown}; use some of {', '.join(CANARIES)} (or [] for none)"
            )
        return tuple(dict.fromkeys(v))

    @field_validator("agent_command", mode="before")
    @classmethod
    def _argv(cls, v: object) -> object:
        if isinstance(v, str):
            return ("sh", "-c", v)
        if isinstance(v, list | tuple) and not v:
            raise ValueError("give at least the program to run")
        return v


def templates_dir() -> Path:
    return configs_dir() / "templates"


def load_template(name_or_path: str | Path) -> Template:
    """A template by name (from `configs/templates/`) or by path to its YAML."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = templates_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            known = ", ".join(t.stem for t in sorted(templates_dir().glob("*.yaml"))) or "none"
            raise ConfigError(
                f"unknown template {name_or_path!r} (known: {known}; "
                f"fix: add configs/templates/{name_or_path}.yaml or pick a known one)"
            )
    template = load_model(path, Template, name=path.stem)
    if template.name != path.stem:
        raise ConfigError(
            f"{path}: name: {template.name!r} differs from the file name "
            f"(fix: set name: {path.stem} or rename the file)"
        )
    image_dir = configs_dir() / "images" / template.image
    if template.image != "base" and not (image_dir / "Dockerfile").exists():
        raise ConfigError(
            f"{path}: image: no recipe configs/images/{template.image}/Dockerfile "
            f"(fix: use `base` or add the recipe)"
        )
    return template


def list_templates() -> list[Template]:
    """Every shipped template, by name."""
    return [load_template(p) for p in sorted(templates_dir().glob("*.yaml"))]
