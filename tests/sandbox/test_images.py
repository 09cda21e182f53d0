"""Images: tagged by recipe content, rebuilt only when the recipe changes, hardened."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from accounting.config import configs_dir
from sandbox.images import build_images, image_ref, recipe_hash, recipe_names


@pytest.fixture
def configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    copy = tmp_path / "configs"
    shutil.copytree(configs_dir(), copy)
    monkeypatch.setenv("SANDFLEET_CONFIGS", str(copy))
    return copy


def test_every_template_image_has_a_recipe() -> None:
    from sandbox.templates import list_templates

    assert {t.image for t in list_templates()} <= set(recipe_names())


def test_tag_changes_only_when_the_recipe_changes(configs: Path) -> None:
    before = {name: recipe_hash(name) for name in ("base", "python")}
    assert {name: recipe_hash(name) for name in ("base", "python")} == before

    dockerfile = configs / "images" / "python" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# a comment changes the recipe\n")
    assert recipe_hash("python") != before["python"]
    assert recipe_hash("base") == before["base"]

    rootfs = configs / "images" / "base" / "rootfs.yaml"
    rootfs.write_text(rootfs.read_text().replace("- git", "- git\n  - curl"))
    assert recipe_hash("base") != before["base"]
    # a template image is FROM the base, so a new base means a new template image too
    assert image_ref("python").startswith("sandfleet/python:")
    assert recipe_hash("python") not in (before["python"],)


@pytest.mark.docker
def test_build_is_a_no_op_when_images_are_up_to_date(docker_client: object) -> None:
    lines: list[str] = []
    refs = build_images(echo=lines.append)
    assert refs == [image_ref(n) for n in recipe_names()]
    assert lines and all("is up to date" in line for line in lines), lines


@pytest.mark.docker
def test_base_image_is_unprivileged_and_has_no_setuid_files(docker_client) -> None:  # type: ignore[no-untyped-def]
    output = docker_client.containers.run(
        image_ref("base"),
        [
            "sh",
            "-c",
            "id -u; id -g; find / -xdev -type f -perm /6000 | wc -l;"
            " python3 -c 'import sqlite3, ssl, venv'",
        ],
        network_mode="none",
        remove=True,
        labels={"sandfleet.test": "images"},
    ).decode()
    uid, gid, setid = output.split()[:3]
    assert (uid, gid, setid) == ("10001", "10001", "0")
