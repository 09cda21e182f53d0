"""Loading YAML config files into pydantic models, with errors a person can act on.

Every file under `configs/` has a model; `load_model(path, Model)` reads it and turns
pydantic's validation errors into one `ConfigError` naming the file, each bad field
and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from accounting.errors import ConfigError

__all__ = ["configs_dir", "describe_validation_error", "load_model", "read_yaml", "repo_root"]

M = TypeVar("M", bound=BaseModel)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_FIXES = {
    "missing": "add it",
    "extra_forbidden": "remove it, or check its spelling against the documented fields",
    "int_parsing": "use a whole number",
    "float_parsing": "use a number",
    "bool_parsing": "use true or false",
    "string_type": "use a string",
    "literal_error": "use one of the allowed values",
    "enum": "use one of the allowed values",
    "greater_than": "use a larger value",
    "greater_than_equal": "use a larger value",
    "less_than_equal": "use a smaller value",
    "dict_type": "use a mapping (key: value)",
    "list_type": "use a list",
}


def repo_root() -> Path:
    """The checkout this package was installed from (editable installs)."""
    return Path(__file__).resolve().parent.parent


def configs_dir() -> Path:
    """`$SANDFLEET_CONFIGS`, else `configs/` of the checkout."""
    env = os.environ.get("SANDFLEET_CONFIGS")
    return Path(env) if env else repo_root() / "configs"


def describe_validation_error(err: ValidationError, *, where: str) -> str:
    """One line per bad field: `where: field.path: problem (fix: ...)`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "value_error":
            # sandfleet's own validators say what to write; no generic fix is needed.
            msg = str(e["msg"]).removeprefix("Value error, ")
            lines.append(f"{where}: {loc}: {msg}")
            continue
        fix = _FIXES.get(e["type"], "see the field's description in the docs")
        lines.append(f"{where}: {loc}: {e['msg']} (fix: {fix})")
    return "\n".join(lines)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file, naming the file and line on a syntax error."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror} (fix: check the path)") from None
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{at} is not valid YAML: {e} (fix: correct the syntax)") from None


def load_model(path: Path, model: type[M], **extra: Any) -> M:
    """Read `path` and validate it as `model`; `extra` fills fields the file may omit."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level (fix: use key: value pairs)"
        )
    try:
        return model.model_validate({**extra, **data})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, where=str(path))) from None
