"""Parse, compare and bump semantic versions."""

from semver.version import Version, bump, compare, parse

__all__ = ["Version", "bump", "compare", "parse"]
