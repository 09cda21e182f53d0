"""Sandbox images, built locally (no registry): a Debian rootfs imported as the base,
then one image per recipe under `configs/images/<name>/Dockerfile`, `FROM` the base.

Every image is tagged by a content hash of its recipe (`sandfleet/<name>:<hash>`), so a
build happens only when the recipe changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from accounting.config import configs_dir, load_model
from accounting.errors import ConfigError, ImageError
from sandbox.engine import apt_install, docker_client

__all__ = [
    "BaseRecipe",
    "build_images",
    "image_exists",
    "image_ref",
    "recipe_hash",
    "recipe_names",
]

REPOSITORY = "sandfleet"
# Bump when the build steps below change in a way that changes the image.
_BUILDER_VERSION = "base-v1"
Echo = Callable[[str], None]


class BaseRecipe(BaseModel):
    """`configs/images/base/rootfs.yaml`: how the Debian rootfs is made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    suite: str = Field(description="Debian suite, e.g. bookworm.")
    mirror: str = Field(description="Debian mirror URL.")
    variant: str = Field("minbase", description="debootstrap variant.")
    packages: tuple[str, ...] = Field(description="Packages added to the variant.")
    uid: int = Field(10001, ge=1000, description="uid and gid of the unprivileged user.")
    user: str = Field("agent", description="Name of the unprivileged user.")


def _images_dir() -> Path:
    return configs_dir() / "images"


def recipe_names() -> list[str]:
    """`base` and every directory under configs/images/ with a Dockerfile."""
    names = sorted(p.parent.name for p in _images_dir().glob("*/Dockerfile"))
    return ["base", *names]


def _hash_tree(root: Path, h: hashlib._Hash) -> None:
    files = (p for p in root.rglob("*") if p.is_file())
    for path in sorted(p for p in files if "__pycache__" not in p.parts and p.suffix != ".pyc"):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(path.read_bytes() + b"\0")


def recipe_hash(name: str) -> str:
    """Content hash of an image's recipe (and, for templates, of the base's)."""
    h = hashlib.sha256()
    if name == "base":
        h.update(_BUILDER_VERSION.encode() + b"\0")
        _hash_tree(_images_dir() / "base", h)
    else:
        recipe = _images_dir() / name
        if not (recipe / "Dockerfile").exists():
            raise ConfigError(
                f"no image recipe configs/images/{name}/Dockerfile "
                f"(fix: pick one of {', '.join(recipe_names())})"
            )
        h.update(recipe_hash("base").encode() + b"\0")
        _hash_tree(recipe, h)
    return h.hexdigest()[:12]


def image_ref(name: str) -> str:
    """The tag of a recipe's image: `sandfleet/<name>:<hash>`."""
    return f"{REPOSITORY}/{name}:{recipe_hash(name)}"


def image_exists(ref: str) -> bool:
    from docker.errors import ImageNotFound

    client = docker_client()
    try:
        client.images.get(ref)
        return True
    except ImageNotFound:
        return False
    finally:
        client.close()


def build_images(
    names: Iterable[str] | None = None, *, force: bool = False, echo: Echo = print
) -> list[str]:
    """Build the named recipes (all when None), base first; return their refs."""
    wanted = list(names) if names else recipe_names()
    unknown = sorted(set(wanted) - set(recipe_names()))
    if unknown:
        raise ConfigError(
            f"unknown image recipe(s) {', '.join(unknown)} "
            f"(fix: pick from {', '.join(recipe_names())})"
        )
    refs = []
    for name in ["base", *[n for n in wanted if n != "base"]]:
        ref = image_ref(name)
        refs.append(ref)
        if not force and image_exists(ref):
            echo(f"images: {name}: {ref} is up to date")
            continue
        if name == "base":
            _build_base(ref, echo)
        else:
            _build_recipe(name, ref, image_ref("base"), echo)
    return refs if names is None or "base" in wanted else refs[1:]


def _build_base(ref: str, echo: Echo) -> None:
    recipe = load_model(_images_dir() / "base" / "rootfs.yaml", BaseRecipe)
    if shutil.which("debootstrap") is None:
        apt_install(["debootstrap"], echo)
    if os.geteuid() != 0:
        raise ImageError("building the base rootfs needs root (fix: run `sudo make setup`)")
    work = Path(tempfile.mkdtemp(prefix="sandfleet-rootfs-", dir="/var/tmp"))
    rootfs = work / "rootfs"
    try:
        echo(f"images: base: debootstrap {recipe.suite} ({recipe.variant}) from {recipe.mirror}")
        argv = [
            "debootstrap",
            f"--variant={recipe.variant}",
            f"--include={','.join(recipe.packages)}",
            recipe.suite,
            str(rootfs),
            recipe.mirror,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log = rootfs / "debootstrap" / "debootstrap.log"
            detail = (
                log.read_text(errors="replace")[-2000:] if log.exists() else done.stderr[-2000:]
            )
            raise ImageError(f"debootstrap failed (exit {done.returncode}):\n{detail}")
        echo(f"images: base: adding user {recipe.user} ({recipe.uid}), stripping setuid/setgid")
        _configure_rootfs(rootfs, recipe)
        echo(f"images: base: docker import as {ref}")
        tar_path = work / "rootfs.tar"
        with tarfile.open(tar_path, "w") as tar:
            tar.add(rootfs, arcname=".")
        client = docker_client(timeout=600)
        try:
            client.api.import_image_from_file(
                str(tar_path),
                repository=ref.split(":")[0],
                tag=ref.split(":")[1],
                changes=[
                    f"USER {recipe.uid}:{recipe.uid}",
                    "WORKDIR /workspace",
                    "ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME=/home/" + recipe.user,
                    'CMD ["/bin/sh"]',
                    f"LABEL sandfleet.recipe={ref}",
                ],
            )
        finally:
            client.close()
        if not image_exists(ref):
            raise ImageError(f"docker import reported success but {ref} is missing")
        echo(f"images: base: {ref} built")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _configure_rootfs(rootfs: Path, recipe: BaseRecipe) -> None:
    uid, user = recipe.uid, recipe.user
    with (rootfs / "etc/passwd").open("a") as f:
        f.write(f"{user}:x:{uid}:{uid}:sandfleet agent:/home/{user}:/bin/sh\n")
    with (rootfs / "etc/group").open("a") as f:
        f.write(f"{user}:x:{uid}:\n")
    with (rootfs / "etc/shadow").open("a") as f:
        f.write(f"{user}:!:19000:0:99999:7:::\n")
    for d in (f"home/{user}", "workspace"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
        os.chown(rootfs / d, uid, uid)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        target = rootfs / junk
        if target.exists():
            shutil.rmtree(target)
            target.mkdir(parents=True)
    _strip_setid(rootfs)


def _strip_setid(rootfs: Path) -> None:
    """Clear every setuid/setgid bit; fail if one survives."""
    for dirpath, _dirs, files in os.walk(rootfs):
        for fname in files:
            path = os.path.join(dirpath, fname)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
                if os.lstat(path).st_mode & (stat.S_ISUID | stat.S_ISGID):
                    raise ImageError(f"could not clear the setuid/setgid bit of {path}")


def _build_recipe(name: str, ref: str, base_ref: str, echo: Echo) -> None:
    from docker.errors import APIError, BuildError

    echo(f"images: {name}: docker build FROM {base_ref}")
    context = Path(tempfile.mkdtemp(prefix=f"sandfleet-build-{name}-", dir="/var/tmp"))
    client = docker_client(timeout=1800)
    try:
        shutil.copytree(_images_dir() / name, context, dirs_exist_ok=True)
        _download_wheels(context, name, echo)
        stream = client.api.build(
            path=str(context),
            tag=ref,
            buildargs={"BASE": base_ref},
            network_mode="host",
            rm=True,
            forcerm=True,
            labels={"sandfleet.recipe": ref},
            decode=True,
        )
        output: deque[str] = deque(maxlen=25)
        for chunk in stream:
            if "error" in chunk:
                tail = "\n".join(output)
                raise ImageError(f"building {ref} failed: {chunk['error'].strip()}\n{tail}")
            line = str(chunk.get("stream", "")).rstrip()
            if line:
                output.append(line)
            if line.startswith("Step "):
                echo(f"images: {name}: {line}")
    except (APIError, BuildError) as e:
        raise ImageError(f"building {ref} failed: {e}") from None
    finally:
        client.close()
        shutil.rmtree(context, ignore_errors=True)
    if not image_exists(ref):
        raise ImageError(f"docker build reported success but {ref} is missing")
    echo(f"images: {name}: {ref} built")


def _download_wheels(context: Path, name: str, echo: Echo) -> None:
    """Fill `context/wheels` from `requirements.txt` with the host's pip (binary wheels for
    the image's CPython 3.11), so the image build needs no network of its own."""
    wheels = context / "wheels"
    wheels.mkdir(exist_ok=True)
    requirements = context / "requirements.txt"
    if not requirements.exists():
        return
    arch = os.uname().machine
    platforms = [f"manylinux{v}_{arch}" for v in ("2014", "_2_17", "_2_28", "_2_34")]
    echo(f"images: {name}: pip download -r requirements.txt (cp311, {arch})")
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    argv += ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    argv += [arg for p in platforms for arg in ("--platform", p)]
    argv += ["-r", str(requirements), "-d", str(wheels)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(
            f"pip download for {name} failed: {done.stderr.strip()[-1500:]}\n"
            f"fix: check configs/images/{name}/requirements.txt and that PyPI is reachable"
        )
