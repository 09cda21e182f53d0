"""Semantic versions: MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]."""

import re
from dataclasses import dataclass

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?$")


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    prerelease: tuple = ()
    build: tuple = ()

    def __str__(self):
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + ".".join(self.build)
        return text


def parse(text):
    """'1.2.3-rc.1+build.5' -> Version(1, 2, 3, ('rc', '1'), ('build', '5'))."""
    m = _VERSION.match(text.strip())
    if m is None:
        raise ValueError(f"not a semantic version: {text!r}")
    major, minor, patch, pre = m.groups()
    return Version(int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else ())


def _key(v):
    """The precedence of `v`: what compare() orders by (build metadata does not count)."""
    return (str(v.major), str(v.minor), str(v.patch)), v.prerelease


def compare(a, b):
    """-1, 0 or 1 as version `a` comes before, with or after `b` (strings are parsed)."""
    ka = _key(parse(a) if isinstance(a, str) else a)
    kb = _key(parse(b) if isinstance(b, str) else b)
    return (ka > kb) - (ka < kb)


def bump(v, part):
    """The next version: part is 'major', 'minor' or 'patch'; lower parts reset to 0."""
    v = parse(v) if isinstance(v, str) else v
    if part == "major":
        return Version(v.major + 1, 0, 0)
    if part == "minor":
        return Version(v.major, v.minor + 1, v.patch)
    if part == "patch":
        return Version(v.major, v.minor, v.patch + 1)
    raise ValueError(f"part must be major, minor or patch, not {part!r}")
