"""A tiny CSV reader and writer."""

from csvlite.reader import parse_line, read_rows, to_dicts
from csvlite.writer import format_line

__all__ = ["format_line", "parse_line", "read_rows", "to_dicts"]
