"""Templates: every shipped YAML loads; bad ones get errors naming file, field and fix."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from accounting.config import configs_dir
from accounting.errors import ConfigError
from sandbox.templates import Template, list_templates, load_template
from scheduler.cli import cli

SHIPPED = sorted((configs_dir() / "templates").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_template_loads(path: Path) -> None:
    template = load_template(path)
    assert isinstance(template, Template)
    assert template.name == path.stem
    assert template.resources.memory > 0 and template.resources.pids >= 16


def test_minimal_and_python_templates_are_shipped() -> None:
    assert {"minimal", "python"} <= {t.name for t in list_templates()}


@pytest.fixture
def configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of configs/ that a test may break."""
    copy = tmp_path / "configs"
    shutil.copytree(configs_dir(), copy)
    monkeypatch.setenv("SANDFLEET_CONFIGS", str(copy))
    return copy


GOOD = (configs_dir() / "templates" / "minimal.yaml").read_text()


@pytest.mark.parametrize(
    ("edit", "field", "fix"),
    [
        (("memory: 512m", "memory: lots"), "resources.memory", "'512m'"),
        (("cpus: 1", "cpus: -2"), "resources.cpus", "larger value"),
        (("pids: 128", "pids: many"), "resources.pids", "whole number"),
        (("timeout: 300", "timeout: 300\ncolour: blue"), "colour", "remove it"),
        (("runtime: runc", "runtime: kata"), "runtime", "allowed values"),
        (
            ("network_allowlist: []", "network_allowlist: ['http://x y']"),
            "network_allowlist",
            "host",
        ),
        (("image: base", "image: nosuch"), "image", "configs/images/nosuch"),
        (("name: minimal", "name: other"), "name", "rename the file"),
        (("warm_pool: 0", "warm_pool: 4"), "warm_pool", "set warm_pool: 0"),
    ],
)
def test_bad_template_error_names_file_field_and_fix(
    configs: Path, edit: tuple[str, str], field: str, fix: str
) -> None:
    path = configs / "templates" / "minimal.yaml"
    path.write_text(GOOD.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_template("minimal")
    message = str(err.value)
    assert str(path) in message
    assert field in message
    assert fix in message


def test_unknown_template_lists_the_known_ones(configs: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown template 'nope' \(known: minimal, python"):
        load_template("nope")


def test_broken_yaml_names_the_line(configs: Path) -> None:
    path = configs / "templates" / "minimal.yaml"
    path.write_text("name: minimal\nresources: [\n")
    with pytest.raises(ConfigError, match=r"minimal.yaml: line \d+ is not valid YAML"):
        load_template("minimal")


def test_templates_check_exits_2_naming_the_bad_file(configs: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["templates", "check"])
    assert ok.exit_code == 0, ok.output
    assert "ok  minimal" in ok.output and "ok  python" in ok.output

    (configs / "templates" / "python.yaml").write_text(
        GOOD.replace("name: minimal", "name: python").replace("pids: 128", "pids: 2")
    )
    from scheduler.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["templates", "check"])
    assert exit_.value.code == 2


def test_templates_show_resolves_the_image_tag() -> None:
    result = CliRunner().invoke(cli, ["templates", "show", "python"])
    assert result.exit_code == 0, result.output
    assert '"image_ref": "sandfleet/python:' in result.output
