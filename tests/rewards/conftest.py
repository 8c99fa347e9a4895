"""Session fixtures for the reward tests: a tiny CLIP built once (Ray comes from tests/conftest.py)."""

from __future__ import annotations

import importlib.util
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REWARD_DIR = os.path.join(REPO, "examples", "reward_function")


def _load_script(name: str):
    """Import scripts/<name>.py by path (scripts/ is not a package)."""
    path = os.path.join(REPO, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_test_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Directory of a tiny random CLIP (16 text tokens, 32 px images), built from a config."""
    output = str(tmp_path_factory.mktemp("tiny_clip"))
    return _load_script("make_tiny_clip").build_tiny_clip(output, seed=0)
