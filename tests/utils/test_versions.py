"""The tested library versions: held to the pins of environment.txt, and compared by major.minor."""

from __future__ import annotations

import os
import re

from pebr.utils.versions import TESTED, installed_versions, versions_tested, untested_versions

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_tested_set_is_the_environments_pins():
    with open(os.path.join(ROOT, "environment.txt")) as f:
        pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([0-9][^,\s]*)", f.read(), re.M))
    for package, (distributions, minors) in TESTED.items():
        pinned = [pins[d] for d in distributions if d in pins]
        assert pinned and all(v.startswith(minors[0] + ".") for v in pinned), (package, pinned, minors)


def test_this_environment_is_a_tested_one():
    assert untested_versions(installed_versions()) == []


def test_other_minor_versions_are_named_and_local_builds_are_not():
    installed = {"torch": "2.11.0+cu130", "transformers": "5.20.1", "ray": None, "vllm": "0.32.1.dev3+g123"}
    assert untested_versions(installed) == ["transformers 5.20.1 (tested: 5.19.x)"]
    assert untested_versions({"torch": "2.12.0"}) == ["torch 2.12.0 (tested: 2.13.x or 2.11.x)"]
    assert versions_tested() == "torch 2.13.x or 2.11.x, transformers 5.19.x, ray 2.60.x, vllm 0.32.x"
