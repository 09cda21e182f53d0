"""A batch made ready to run: its tasks, their templates and images, checked against quotas.

`plan_batch(spec, backend=..., policies=...)` does every check that can refuse a batch
before anything starts (no Ray, no container): each template exists, its image has a
recipe, and one sandbox of it fits the team's quotas. A refusal is a `ConfigError`
naming the task, the field and the fix (the CLI exits 2 on it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from accounting.errors import ConfigError
from accounting.policies import Policies
from sandbox.templates import Template, load_template
from scheduler.spec import BatchSpec, TaskSpec

__all__ = ["Backend", "Plan", "plan_batch"]


class Backend(str, Enum):  # noqa: UP042 - the style guide's `str, Enum`
    """Where attempts run: real Docker sandboxes, or the in-memory `FakeBackend`."""

    DOCKER = "docker"
    FAKE = "fake"

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        try:
            return cls(value)
        except ValueError:
            raise ConfigError(
                f"--backend {value!r} is not a backend (fix: use docker, or fake for the "
                "in-memory test backend)"
            ) from None


@dataclass(frozen=True)
class Plan:
    """A validated batch with everything the scheduler needs to run it."""

    spec: BatchSpec
    tasks: tuple[TaskSpec, ...]
    templates: Mapping[str, Template]
    images: Mapping[str, str]
    backend: Backend

    @property
    def batch_id(self) -> str:
        return self.spec.batch_id

    @property
    def team(self) -> str:
        return self.spec.team


def _image(template: Template) -> str:
    from sandbox.images import image_ref

    return image_ref(template.image)


def plan_batch(
    spec: BatchSpec, *, backend: Backend | str = Backend.DOCKER, policies: Policies
) -> Plan:
    """Resolve templates and images and check quotas; raise ConfigError on the first problem."""
    kind = Backend.parse(backend)
    tasks = tuple(spec.task_specs())
    templates: dict[str, Template] = {}
    images: dict[str, str] = {}
    team = policies.team(spec.team)
    for task in tasks:
        if task.template in templates:
            continue
        where = f"batch {spec.name}: task {task.index} ({task.task_id})"
        try:
            template = load_template(task.template)
        except ConfigError as e:
            raise ConfigError(f"{where}: template: {e}") from None
        res = template.resources
        too_big = [
            f"{what} {need} > {cap}"
            for what, need, cap in (
                ("cpus", res.cpus, team.max_cpus),
                ("memory", res.memory, team.max_memory),
            )
            if need > cap
        ]
        if too_big:
            raise ConfigError(
                f"{where}: template {template.name!r} can never run for team {spec.team!r} "
                f"({', '.join(too_big)} of the team's quota) (fix: raise the team's quota in "
                "configs/policies.yaml or use a smaller template)"
            )
        templates[task.template] = template
        images[task.template] = _image(template)
    return Plan(spec=spec, tasks=tasks, templates=templates, images=images, backend=kind)
