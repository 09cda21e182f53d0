"""Reading batch files: the YAML, its `tasks_from:` table, and errors about their rows.

A task table is JSONL (one object per line) or Parquet; both become a list of plain
dicts (one per task) for `scheduler.spec` to validate in one pass. A Parquet null
means "not given", so null cells are dropped from the row. Errors about a row name
the file, the task's index, id and (JSONL) line, the field, and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from accounting.errors import ConfigError

__all__ = [
    "FIXES",
    "MAX_ERRORS_SHOWN",
    "describe_header_errors",
    "describe_task_errors",
    "read_batch_yaml",
    "read_task_rows",
    "who",
]

MAX_ERRORS_SHOWN = 20

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

# pydantic error type -> what the user should do about it.
FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it, or check its spelling against the documented fields",
    "int_type": "use a whole number",
    "int_parsing": "use a whole number",
    "string_type": "use a string (quote it in YAML)",
    "string_pattern_mismatch": "use letters, digits, '.', '_' or '-' (first: a letter or digit)",
    "string_too_short": "give a non-empty value",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "decimal_type": "use a number of USD, e.g. 2.50",
    "decimal_parsing": "use a number of USD, e.g. 2.50",
    "decimal_max_places": "use at most 9 decimal places (nano-USD)",
    "finite_number": "use a finite number",
    "dict_type": "use a mapping (key: value)",
    "list_type": "use a list",
    "tuple_type": "use a list",
    "model_type": "write each task as a mapping (repo:, prompt:, ...)",
    "command_type": "use an argv list like [python, run.py] or one shell string",
    "command_empty": "give the command to run, or drop `command` to use the template's",
    "env_name": "use letters, digits and '_' (not starting with a digit)",
    "no_work": "add a prompt (or a command)",
}


def read_batch_yaml(path: Path) -> Any:
    """Like `accounting.config.read_yaml`, with libyaml's parser when present (5x faster)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e} (fix: check the path)") from None
    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{at} is not valid YAML: {e} (fix: correct the syntax)") from None


def who(index: int, task_id: Any, lines: Sequence[int] | None) -> str:
    """`task 17 (id 'fix-login') [line 18]`: how errors point at one task."""
    text = f"task {index}"
    if isinstance(task_id, str) and task_id:
        text += f" (id {task_id!r})"
    if lines is not None:
        text += f" [line {lines[index]}]"
    return text


def describe_header_errors(err: ValidationError, where: str) -> str:
    """One line per bad top-level field: `file: field: problem (fix: ...)`."""
    return "\n".join(
        f"{where}: {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']} "
        f"(fix: {FIXES.get(e['type'], 'see the field in scheduler/README.md')})"
        for e in err.errors()[:MAX_ERRORS_SHOWN]
    )


def describe_task_errors(
    err: ValidationError, rows: Sequence[Any], where: str, lines: Sequence[int] | None
) -> str:
    """One line per bad field: file, task index and id, field, problem, fix."""
    out = []
    errors = err.errors()
    for e in errors[:MAX_ERRORS_SHOWN]:
        loc = e["loc"]
        index = loc[0] if loc and isinstance(loc[0], int) else 0
        row = rows[index] if index < len(rows) else None
        task_id = row.get("id") if isinstance(row, dict) else None
        field = ".".join(str(p) for p in loc[1:]) or "(the task)"
        fix = FIXES.get(e["type"], "see the field in scheduler/README.md")
        out.append(f"{where}: {who(index, task_id, lines)}: {field}: {e['msg']} (fix: {fix})")
    if len(errors) > MAX_ERRORS_SHOWN:
        out.append(f"{where}: ... and {len(errors) - MAX_ERRORS_SHOWN} more problems")
    return "\n".join(out)


def read_task_rows(
    base_dir: Path, name: str, where: str
) -> tuple[str, list[Any], list[int] | None]:
    """Rows of the task table `name` (relative to `base_dir`).

    Returns the table's path (for error messages), its rows, and for JSONL the line
    number of every row (`None` for Parquet).
    """
    try:
        path = (base_dir / name).absolute()
        exists = path.is_file()
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: tasks_from: {name!r} is not a usable path: {e}") from None
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise ConfigError(
            f"{where}: tasks_from: {name!r} is neither JSONL nor Parquet "
            "(fix: name a .jsonl or .parquet file)"
        )
    if not exists:
        raise ConfigError(
            f"{where}: tasks_from: {path} does not exist "
            "(fix: give the path relative to the batch file)"
        )
    if suffix in JSONL_SUFFIXES:
        rows, lines = _read_jsonl(path)
        return str(path), rows, lines
    return str(path), _read_parquet(path), None


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e} (fix: check the file)") from None
    rows: list[Any] = []
    lines: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line, parse_float=Decimal))
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}: line {number}: not valid JSON: {e.msg} "
                "(fix: write one JSON object per line)"
            ) from None
        lines.append(number)
    return rows, lines


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"{path}: cannot read as Parquet: {e} (fix: check the file)") from None
    columns = table.to_pydict()
    names = list(columns)
    return [
        {k: v for k, v in zip(names, values, strict=True) if v is not None}
        for values in zip(*columns.values(), strict=True)
    ]
