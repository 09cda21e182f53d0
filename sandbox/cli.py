"""`sandfleet engine|images|templates|sandbox`: the node's commands."""

from __future__ import annotations

import json

import click

from sandbox.sandbox_cli import COMMANDS as SANDBOX_COMMANDS

__all__ = ["COMMANDS"]


@click.group("engine")
def engine_group() -> None:
    """The local Docker engine."""


@engine_group.command("ensure")
@click.option(
    "--log", "log_path", help="dockerd log file (default /var/log/sandfleet-dockerd.log)."
)
def engine_ensure(log_path: str | None) -> None:
    """Make sure a Docker engine answers: install docker.io and start dockerd if needed."""
    from sandbox.engine import ensure_engine

    ensure_engine(log_path=log_path, echo=click.echo)


@click.group("images")
def images_group() -> None:
    """Sandbox images (built locally from a Debian rootfs; no registry)."""


@images_group.command("build")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even when the recipe is unchanged.")
def images_build(names: tuple[str, ...], force: bool) -> None:
    """Build the base image and each recipe's image (all when NAMES is empty)."""
    from sandbox.images import build_images

    build_images(list(names) or None, force=force, echo=click.echo)


@images_group.command("list")
def images_list() -> None:
    """Each recipe, its content-hashed tag, and whether it is built."""
    from sandbox.images import image_exists, image_ref, recipe_names

    for name in recipe_names():
        ref = image_ref(name)
        click.echo(f"{name:12} {ref:32} {'built' if image_exists(ref) else 'missing'}")


@click.group("templates")
def templates_group() -> None:
    """Sandbox templates (configs/templates/*.yaml)."""


@templates_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def templates_list(as_json: bool) -> None:
    """Every template with its image and limits."""
    from accounting.units import format_bytes
    from sandbox.templates import list_templates

    templates = list_templates()
    if as_json:
        click.echo(json.dumps([t.model_dump(mode="json") for t in templates], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "image", "cpus", "memory", "pids", "timeout", "egress", "description")
    for t in templates:
        r = t.resources
        table.add_row(
            t.name,
            t.image,
            f"{r.cpus:g}",
            format_bytes(r.memory),
            str(r.pids),
            f"{t.timeout}s",
            ", ".join(t.network_allowlist) or "none",
            t.description,
        )
    Console().print(table)


@templates_group.command("show")
@click.argument("name")
def templates_show(name: str) -> None:
    """One template, fully resolved (JSON), with its image tag."""
    from sandbox.images import image_ref
    from sandbox.templates import load_template

    t = load_template(name)
    click.echo(json.dumps({**t.model_dump(mode="json"), "image_ref": image_ref(t.image)}, indent=2))


@templates_group.command("check")
@click.argument("paths", nargs=-1, type=click.Path(dir_okay=False))
def templates_check(paths: tuple[str, ...]) -> None:
    """Validate templates (every shipped one when PATHS is empty); exit 2 on the first error."""
    from sandbox.templates import list_templates, load_template

    templates = [load_template(p) for p in paths] if paths else list_templates()
    for t in templates:
        click.echo(f"ok  {t.name}")


COMMANDS: list[click.Command] = [engine_group, images_group, templates_group, *SANDBOX_COMMANDS]
