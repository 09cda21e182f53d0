"""Batch specs: a YAML file of agent tasks, validated, with a stable id for every task.

A batch file (`configs/batches/*.yaml`) names the batch, the team, its priority and
budget, defaults for every task, and the tasks: inline under `tasks:`, or in a JSONL
or Parquet table named by `tasks_from:` (relative to the YAML). `load_batch(path)`
validates it into a `BatchSpec`; `BatchSpec.task_specs()` expands every task with the
defaults into a frozen `TaskSpec`, the unit the queue and the runner work with.

A task without an `id` gets one derived from its content (`t-` + 12 hex digits of a
sha256), so the same file gives the same ids on every run; identical tasks get `-2`,
`-3`, ... in file order. A batch's `content_hash` covers every field of every task,
not the file's formatting nor where its tasks were read from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from accounting.errors import ConfigError
from scheduler.batchfile import (
    MAX_ERRORS_SHOWN,
    describe_header_errors,
    describe_task_errors,
    read_batch_yaml,
    read_task_rows,
    who,
)

__all__ = ["BatchDefaults", "BatchSpec", "TaskEntry", "TaskSpec", "load_batch", "parse_batch"]

NANO_USD_PER_USD = 1_000_000_000

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
TaskId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
Usd = Annotated[Decimal, Field(ge=0, le=Decimal("1e9"), decimal_places=9)]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
Seconds = Annotated[int, Strict(), Field(gt=0, le=7 * 86400)]
Attempts = Annotated[int, Strict(), Field(ge=1, le=20)]


def _argv(value: Any) -> Any:
    """`command:` as an argv list, or one string run by `sh -c` (Docker's shell form)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError("command_empty", "the command is empty")
        return ("sh", "-c", value)
    if isinstance(value, list | tuple):
        if not value:
            raise PydanticCustomError("command_empty", "the command is empty")
        return tuple(value)
    raise PydanticCustomError("command_type", "must be an argv list or one shell string")


def _env_name(value: str) -> str:
    if not _ENV_NAME.match(value):
        raise PydanticCustomError(
            "env_name", "'{name}' is not an environment variable name", {"name": value}
        )
    return value


def _mapping(value: Any) -> Any:
    """Parquet map columns arrive as a list of (key, value) pairs."""
    if isinstance(value, list) and all(isinstance(p, tuple) and len(p) == 2 for p in value):
        return dict(value)
    return value


def _sorted(value: dict[str, str]) -> dict[str, str]:
    """Key order never changes a task's id or the batch hash."""
    return value if len(value) < 2 else dict(sorted(value.items()))


EnvName = Annotated[str, AfterValidator(_env_name)]
Command = Annotated[tuple[str, ...] | None, BeforeValidator(_argv)]
Env = Annotated[dict[EnvName, str], BeforeValidator(_mapping), AfterValidator(_sorted)]
Labels = Annotated[dict[str, str], BeforeValidator(_mapping), AfterValidator(_sorted)]


class TaskEntry(BaseModel):
    """One task as written in the batch file (before the defaults apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: TaskId | None = Field(
        None, description="Unique within the batch; derived from the content when omitted."
    )
    repo: str = Field(
        min_length=1,
        description="Git URL, or a local path (relative to the batch file) to clone from.",
    )
    ref: str = Field("HEAD", min_length=1, description="Branch, tag or commit to check out.")
    prompt: str = Field("", description="What the agent is asked to do.")
    command: Command = Field(
        None, description="Agent command override: an argv list, or a string run by `sh -c`."
    )
    env: Env = Field(default_factory=dict, description="Extra environment for the agent.")
    labels: Labels = Field(default_factory=dict, description="Free-form labels, kept in reports.")
    task_type: Name = Field("agent", description="Kind of task, for cost reports.")
    template: Name | None = Field(None, description="Overrides defaults.template.")
    timeout: Seconds | None = Field(None, description="Overrides defaults.timeout (seconds).")
    max_attempts: Attempts | None = Field(None, description="Overrides defaults.max_attempts.")
    model: str | None = Field(None, min_length=1, description="Overrides defaults.model.")
    budget: Usd | None = Field(None, description="Overrides defaults.budget (USD).")

    @model_validator(mode="after")
    def _has_work(self) -> TaskEntry:
        if not self.prompt and self.command is None:
            raise PydanticCustomError("no_work", "the task has neither a prompt nor a command")
        return self


class BatchDefaults(BaseModel):
    """Values every task of the batch gets unless it sets its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: Name = Field("minimal", description="Sandbox template (configs/templates/).")
    timeout: Seconds = Field(3600, description="Wall-clock limit of one attempt, in seconds.")
    max_attempts: Attempts = Field(3, description="Attempts per task on infrastructure failure.")
    model: str | None = Field(None, min_length=1, description="LLM the agent may call.")
    budget: Usd | None = Field(None, description="Spend cap of one task, in USD.")


class BatchFile(BaseModel):
    """The top level of a batch YAML file; `tasks` are validated separately, row by row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name = Field(description="Batch name; with the content hash it makes the batch id.")
    team: Name = Field(description="Team that owns and pays for the batch.")
    priority: Annotated[int, Strict(), Field(ge=-1000, le=1000)] = Field(
        0, description="Higher runs first, across all teams."
    )
    budget: Usd | None = Field(None, description="Spend cap of the whole batch, in USD.")
    description: str = Field("", description="Free text.")
    defaults: BatchDefaults = Field(default_factory=BatchDefaults)
    tasks: list[Any] | None = Field(None, description="The tasks, inline.")
    tasks_from: str | None = Field(
        None, min_length=1, description="A .jsonl or .parquet file of tasks, relative to the YAML."
    )


_TASKS = TypeAdapter(list[TaskEntry])


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task with the batch defaults applied: what the queue admits and the runner runs."""

    batch: str
    team: str
    priority: int
    index: int
    task_id: str
    repo: str
    ref: str
    prompt: str
    command: tuple[str, ...] | None
    env: tuple[tuple[str, str], ...]
    labels: tuple[tuple[str, str], ...]
    task_type: str
    template: str
    timeout_s: int
    max_attempts: int
    model: str | None
    budget_usd: Decimal | None

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)

    @property
    def labels_dict(self) -> dict[str, str]:
        return dict(self.labels)

    @property
    def budget_nusd(self) -> int | None:
        """The per-task budget in integer nano-USD (the ledger's unit)."""
        return None if self.budget_usd is None else int(self.budget_usd * NANO_USD_PER_USD)


@dataclass(frozen=True)
class BatchSpec:
    """A validated batch: header, defaults and tasks, every task with its final id."""

    name: str
    team: str
    priority: int
    budget: Decimal | None
    description: str
    defaults: BatchDefaults
    tasks: tuple[TaskEntry, ...]
    base_dir: str
    content_hash: str
    run_tag: str = ""
    """Set to run the same content again as a new batch (`sandfleet run --again`)."""

    @property
    def batch_id(self) -> str:
        """`<name>-<first 10 hex digits of the content hash>[-<run tag>]`: same content, same
        id, unless a run tag asks for a new batch."""
        base = f"{self.name}-{self.content_hash[:10]}"
        return f"{base}-{self.run_tag}" if self.run_tag else base

    def again(self, tag: str) -> BatchSpec:
        """The same batch under a new id (`<id>-<tag>`), e.g. a second run of a demo."""
        if not re.fullmatch(r"[A-Za-z0-9]{1,32}", tag):
            raise ConfigError(f"run tag {tag!r}: use 1 to 32 letters and digits")
        return replace(self, run_tag=tag)

    def task_specs(self) -> list[TaskSpec]:
        """Every task, expanded with the defaults, in file order."""
        d, batch_id = self.defaults, self.batch_id
        out = []
        for i, t in enumerate(self.tasks):
            out.append(
                TaskSpec(
                    batch=batch_id,
                    team=self.team,
                    priority=self.priority,
                    index=i,
                    task_id=t.id or "",
                    repo=resolve_repo(t.repo, self.base_dir),
                    ref=t.ref,
                    prompt=t.prompt,
                    command=t.command,
                    env=tuple(sorted(t.env.items())),
                    labels=tuple(sorted(t.labels.items())),
                    task_type=t.task_type,
                    template=t.template or d.template,
                    timeout_s=t.timeout or d.timeout,
                    max_attempts=t.max_attempts or d.max_attempts,
                    model=t.model or d.model,
                    budget_usd=t.budget if t.budget is not None else d.budget,
                )
            )
        return out

    def to_record(self) -> dict[str, Any]:
        """The spec as plain JSON data (for the ledger's `batch_submitted` event)."""
        return {
            **_header(self.name, self.team, self.priority, self.budget, self.description),
            "defaults": self.defaults.model_dump(mode="json", exclude_none=True),
            "tasks": [t.model_dump(mode="json", exclude_defaults=True) for t in self.tasks],
            "base_dir": self.base_dir,
            "content_hash": self.content_hash,
            "run_tag": self.run_tag,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> BatchSpec:
        """Rebuild a spec from `to_record()` output (resume); the hash must still match."""
        meta = ("base_dir", "content_hash", "run_tag")
        data = {k: v for k, v in record.items() if k not in meta}
        spec = parse_batch(data, source=Path(record["base_dir"]) / "(ledger record)")
        if spec.content_hash != record.get("content_hash"):
            raise ConfigError(
                f"batch {record.get('name')!r}: the stored spec does not match its content hash "
                "(fix: the ledger record was altered; run `sandfleet audit verify`)"
            )
        return spec.again(record["run_tag"]) if record.get("run_tag") else spec


def load_batch(path: str | os.PathLike[str]) -> BatchSpec:
    """Read and validate a batch YAML file (and its `tasks_from:` table)."""
    source = Path(path)
    return parse_batch(read_batch_yaml(source), source=source)


def parse_batch(data: Any, *, source: Path) -> BatchSpec:
    """Validate already-parsed batch data; `source` names the file in errors and anchors paths."""
    where = str(source)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{where}: expected a mapping at the top level (fix: use key: value pairs)"
        )
    try:
        head = BatchFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe_header_errors(e, where)) from None
    if (head.tasks is None) == (head.tasks_from is None):
        raise ConfigError(
            f"{where}: give exactly one of `tasks` (inline) or `tasks_from` (a .jsonl or "
            ".parquet file) (fix: keep one of them)"
        )
    lines: Sequence[int] | None = None
    if head.tasks_from is not None:
        where, rows, lines = read_task_rows(source.parent, head.tasks_from, where)
    else:
        rows = head.tasks or []
    if not rows:
        raise ConfigError(f"{where}: the batch has no tasks (fix: add at least one task)")
    try:
        entries = _TASKS.validate_python(rows)
    except ValidationError as e:
        raise ConfigError(describe_task_errors(e, rows, where, lines)) from None
    tasks, digest = _assign_ids(entries, where, lines)
    header = _header(head.name, head.team, head.priority, head.budget, head.description)
    digest.update(_canon(header))
    digest.update(head.defaults.model_dump_json(exclude_none=True).encode())
    return BatchSpec(
        name=head.name,
        team=head.team,
        priority=head.priority,
        budget=head.budget,
        description=head.description,
        defaults=head.defaults,
        tasks=tasks,
        base_dir=str(source.parent.absolute()),
        content_hash=digest.hexdigest(),
    )


def resolve_repo(repo: str, base_dir: str) -> str:
    """A git URL as is; a local path made absolute against the batch file's folder."""
    if "://" in repo or re.match(r"^[\w.-]+@[\w.-]+:", repo):
        return repo
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(repo)))


def _header(
    name: str, team: str, priority: int, budget: Decimal | None, description: str
) -> dict[str, Any]:
    head: dict[str, Any] = {"name": name, "team": team, "priority": priority}
    if budget is not None:
        head["budget"] = str(budget)
    if description:
        head["description"] = description
    return head


def _canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _assign_ids(
    entries: list[TaskEntry], where: str, lines: Sequence[int] | None
) -> tuple[tuple[TaskEntry, ...], Any]:
    """Derive missing ids, refuse duplicates, and hash every task in order."""
    first_index: dict[str, int] = {
        e.id: i for i, e in reversed(list(enumerate(entries))) if e.id is not None
    }
    duplicates = [
        (first_index[e.id], i, e.id)
        for i, e in enumerate(entries)
        if e.id is not None and first_index[e.id] != i
    ]
    if duplicates:
        raise ConfigError(
            "\n".join(
                f"{where}: {who(a, None, lines)} and {who(b, None, lines)} both have id {tid!r} "
                "(fix: give each task a unique id, or drop the ids to derive them from content)"
                for a, b, tid in duplicates[:MAX_ERRORS_SHOWN]
            )
        )
    used = set(first_index)
    digest = hashlib.sha256()
    for e in entries:
        body = e.model_dump_json(exclude_defaults=True, exclude={"id"}).encode()
        if e.id is None:
            base = "t-" + hashlib.sha256(body).hexdigest()[:12]
            tid, n = base, 1
            while tid in used:
                n += 1
                tid = f"{base}-{n}"
            used.add(tid)
            # The entry was built a moment ago and nobody else holds it yet: fill in its
            # id in place (model_copy would double the load time of 100,000 tasks).
            e.__dict__["id"] = tid
            e.__pydantic_fields_set__.add("id")
        digest.update(f"{e.id}\0".encode())
        digest.update(body)
        digest.update(b"\n")
    return tuple(entries), digest
