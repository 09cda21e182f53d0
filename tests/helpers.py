"""Helpers shared by the tests (importable as `helpers`: pytest's pythonpath holds tests/)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_engine(reason: str) -> None:
    """Skip on a developer's machine; fail under CI, where every engine must be present."""
    if CI:
        pytest.fail(f"{reason} (CI=true: engines are required; run `make setup`)")
    pytest.skip(reason)


def require_image(docker_client: Any, recipe: str) -> str:
    """The content-hashed tag of a recipe's image, or skip (fail under CI) when not built."""
    from docker.errors import ImageNotFound

    from sandbox.images import image_ref

    ref = image_ref(recipe)
    try:
        docker_client.images.get(ref)
    except ImageNotFound:
        missing_engine(f"image {ref} is not built (run `sandfleet images build`)")
    return ref


def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
