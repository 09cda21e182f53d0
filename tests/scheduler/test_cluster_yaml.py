"""cluster.yaml and configs/cluster-fake.yaml pass Ray's own config checks (offline)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private import providers
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
FAKE_YAML = REPO / "configs" / "cluster-fake.yaml"


def prepared(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Ray's prepare_config + validate_config, as `ray up` and the monitor run them.

    The wheel lacks the fake provider's defaults file, so the fake yaml (complete on its
    own) stands in as its own defaults; AWS defaults ship with Ray. No cloud call is made.
    """
    monkeypatch.setitem(providers._DEFAULT_CONFIGS, "fake_multinode", lambda: str(FAKE_YAML))
    config = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(config)
    return config


def workers(config: dict[str, Any]) -> dict[str, Any]:
    head = config["head_node_type"]
    return {k: v for k, v in config["available_node_types"].items() if k != head}


@pytest.mark.parametrize("path", [CLUSTER_YAML, FAKE_YAML], ids=["cluster.yaml", "fake"])
def test_cluster_config_passes_rays_checks(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = prepared(path, monkeypatch)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert head["resources"]["sandfleet_head"] == 1
    assert "sandbox_slots" not in head["resources"]
    assert workers(config)
    for node_type in workers(config).values():
        assert node_type["resources"]["sandbox_slots"] >= 1
        assert node_type["min_workers"] == 0 and node_type["max_workers"] >= 1
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_cluster_yaml_is_aws_with_spot_and_on_demand_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = prepared(CLUSTER_YAML, monkeypatch)
    assert config["cluster_name"] == "sandfleet"
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["provider"]["availability_zone"]
    markets = {
        name: node["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")
        for name, node in workers(config).items()
    }
    assert sorted(markets.values()) == ["on-demand", "spot"]
    assert sum(n["max_workers"] for n in workers(config).values()) >= config["max_workers"]


def test_cluster_yaml_installs_docker_and_a_pinned_sandfleet_and_builds_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = prepared(CLUSTER_YAML, monkeypatch)
    setup = "\n".join(config["setup_commands"])
    assert "apt-get install -y docker.io" in setup
    assert "systemctl enable --now docker" in setup
    assert '"sandfleet==0.1.0"' in setup and '"ray[default]==2.60.0"' in setup
    assert any("sandfleet images build" in c for c in config["worker_setup_commands"])
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert any("$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])


def test_a_misspelt_key_fails_rays_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    broken = copy.deepcopy(config)
    broken["available_node_types"]["sandbox.spot"]["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(broken))
