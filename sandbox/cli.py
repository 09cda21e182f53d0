"""`sandfleet engine|images|templates|sandbox`: the node's commands."""

from __future__ import annotations

import click

__all__ = ["COMMANDS"]

COMMANDS: list[click.Command] = []
