"""Where sandfleet keeps its data: `--data-dir`, else `$SANDFLEET_DATA`, else `./sandfleet-data`."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "resolve_data_dir"]

DEFAULT_DATA_DIR = "sandfleet-data"


def resolve_data_dir(flag: str | os.PathLike[str] | None = None) -> str:
    """The data directory (a local path or a pyarrow filesystem URI such as `s3://...`).

    Local paths are made absolute so that actors and sandboxes agree on them.
    """
    value = os.fspath(flag) if flag else os.environ.get("SANDFLEET_DATA") or DEFAULT_DATA_DIR
    if "://" in value:
        return value
    return str(Path(value).expanduser().resolve())
