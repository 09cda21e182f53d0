"""Policies (and every shipped YAML of the ledger's): loaded through their models; bad
files give one error naming the file, the field and the fix."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from accounting.config import configs_dir, load_model
from accounting.errors import ConfigError
from accounting.policies import (
    RULES,
    Action,
    Policies,
    Severity,
    load_policies,
    parse_bytes,
)
from accounting.pricing import PriceList

SHIPPED = {"pricing.yaml": PriceList, "policies.yaml": Policies}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_ledger_config_loads_through_its_model(name: str) -> None:
    model = load_model(configs_dir() / name, SHIPPED[name])
    assert model is not None


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "policies.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _base() -> dict:
    return yaml.safe_load((configs_dir() / "policies.yaml").read_text())


def test_shipped_policies_have_all_eight_rules_with_an_action() -> None:
    p = load_policies()
    assert RULES == (
        "repeated_command",
        "runaway_llm",
        "cost_outlier",
        "cpu_pegged",
        "memory_pressure",
        "denied_egress",
        "sensitive_files",
        "stuck",
    )
    for name in RULES:
        rule = getattr(p.anomalies, name)
        assert rule.action in set(Action) and rule.severity in set(Severity)
    assert p.task.budget_usd == Decimal("2.00") and p.batch.budget_usd == Decimal("100.00")


def test_a_listed_team_overrides_only_what_it_names(tmp_path: Path) -> None:
    data = _base()
    data["teams"] = {"alpha": {"weight": 4, "daily_usd": "7.25"}}
    p = load_policies(_write(tmp_path, data))
    alpha = p.team("alpha")
    assert alpha.weight == 4 and alpha.daily_usd == Decimal("7.25")
    assert alpha.max_sandboxes == p.defaults.max_sandboxes
    assert alpha.monthly_usd == p.defaults.monthly_usd


def test_an_unlisted_team_gets_the_defaults() -> None:
    p = load_policies()
    assert p.team("nobody-listed-this") == p.defaults


def test_an_explicit_null_cap_means_no_cap(tmp_path: Path) -> None:
    data = _base()
    data["teams"] = {"free": {"monthly_usd": None}}
    p = load_policies(_write(tmp_path, data))
    assert p.team("free").monthly_usd is None
    assert p.team("free").daily_usd == p.defaults.daily_usd


def test_memory_is_bytes_or_a_size_with_binary_units() -> None:
    assert parse_bytes("8g") == 8 * 1024**3
    assert parse_bytes("512m") == 512 * 1024**2
    assert parse_bytes("1GiB") == 1024**3
    assert parse_bytes("1.5g") == 3 * 1024**3 // 2
    assert parse_bytes(4096) == 4096
    assert load_policies().team("demo").max_memory == 8 * 1024**3


def test_money_is_an_exact_decimal_never_a_float(tmp_path: Path) -> None:
    data = _base()
    data["defaults"]["daily_usd"] = 0.1  # an unquoted YAML float
    assert load_policies(_write(tmp_path, data)).defaults.daily_usd == Decimal("0.1")
    data["defaults"]["daily_usd"] = 0.1234567890123456  # too many digits to be sure of
    with pytest.raises(ConfigError, match=r"defaults\.daily_usd.*quote it"):
        load_policies(_write(tmp_path, data))


@pytest.mark.parametrize(
    ("edit", "field", "fix"),
    [
        (
            lambda d: d["teams"]["demo"].update(max_memory="8 potatoes"),
            "teams.demo.max_memory",
            "512m",
        ),
        (lambda d: d["defaults"].update(weight=0), "defaults.weight", "larger value"),
        (lambda d: d["defaults"].update(colour="red"), "defaults.colour", "remove it"),
        (lambda d: d["defaults"].pop("max_cpus"), "defaults.max_cpus", "add it"),
        (lambda d: d["task"].update(budget_usd="lots"), "task.budget_usd", '"2.50"'),
        (lambda d: d["defaults"].update(daily_usd="-5"), "defaults.daily_usd", ">= 0"),
        (
            lambda d: d["anomalies"]["cpu_pegged"].update(webhook="https://hooks.example/x"),
            "anomalies.cpu_pegged",
            "only used with action: escalate",
        ),
        (
            lambda d: d["anomalies"]["denied_egress"].update(webhook="ftp://x"),
            "anomalies.denied_egress.webhook",
            "http:// or https://",
        ),
        (
            lambda d: d["anomalies"]["sensitive_files"].update(credential_patterns=["(unclosed"]),
            "anomalies.sensitive_files.credential_patterns",
            "not a valid regex",
        ),
        (
            lambda d: d["anomalies"]["cpu_pegged"].update(action="panic"),
            "anomalies.cpu_pegged.action",
            "allowed values",
        ),
        (lambda d: d["anomalies"].update(rule_nine={}), "anomalies.rule_nine", "remove it"),
    ],
)
def test_a_bad_policies_file_names_the_file_the_field_and_the_fix(
    tmp_path: Path, edit, field: str, fix: str
) -> None:
    data = _base()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_policies(path)
    message = str(err.value)
    assert str(path) in message
    assert field in message
    assert fix in message


def test_a_bad_price_list_names_the_file_the_field_and_the_fix(tmp_path: Path) -> None:
    data = yaml.safe_load((configs_dir() / "pricing.yaml").read_text())
    data["models"][0]["usd_per_1m_tokens"].pop("reasoning")
    data["models"][1]["aliases"] = [data["models"][0]["name"]]
    path = tmp_path / "pricing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_model(path, PriceList)
    message = str(err.value)
    assert str(path) in message
    assert "models.0.usd_per_1m_tokens.reasoning" in message and "add it" in message


def test_a_model_name_used_twice_is_refused_naming_both(tmp_path: Path) -> None:
    data = yaml.safe_load((configs_dir() / "pricing.yaml").read_text())
    data["models"][1]["aliases"] = [data["models"][0]["name"].upper()]
    path = tmp_path / "pricing.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="used by both"):
        load_model(path, PriceList)


def test_a_policies_file_that_is_not_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text("defaults:\n  weight: [1\n")
    with pytest.raises(ConfigError, match=r"line \d+ is not valid YAML"):
        load_policies(path)
