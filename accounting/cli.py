"""`sandfleet ledger|audit|report|sql|anomalies`: the ledger's commands."""

from __future__ import annotations

import click

from accounting.ledger_cli import COMMANDS as LEDGER_COMMANDS
from accounting.report_cli import COMMANDS as REPORT_COMMANDS

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = [*LEDGER_COMMANDS, *REPORT_COMMANDS]
