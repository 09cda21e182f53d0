"""`sandfleet ledger|audit|report|sql|anomalies`: the ledger's commands."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = []
