"""The `sandfleet` command: one root group; each package contributes its own commands."""

from __future__ import annotations

import sys

import click

from accounting.errors import ConfigError, SandfleetError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="sandfleet")
def cli() -> None:
    """Run batches of AI coding-agent tasks in hardened sandboxes, metered into a ledger."""


def _register() -> None:
    from accounting import cli as accounting_cli
    from sandbox import cli as sandbox_cli
    from scheduler import batch_cli, estimate_cli, monitor_cli

    for group in (batch_cli, estimate_cli, monitor_cli, sandbox_cli, accounting_cli):
        for command in group.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: sandfleet errors become one clear line and an exit status, not a traceback."""
    try:
        code = cli.main(args=argv, prog_name="sandfleet", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except ConfigError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except SandfleetError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
