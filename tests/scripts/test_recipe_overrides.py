"""The bash recipes refuse an override of a setting they also use after the Python step."""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("recipe, override, variable", [
    ("pebr_stage1.sh", "trainer.save_checkpoint_path=/tmp/elsewhere", "RUN_DIR"),
    ("pebr_stage1_cpu.sh", "trainer.save_checkpoint_path=/tmp/elsewhere", "RUN_DIR"),
    ("pebr_stage2.sh", "worker.actor.model.model_path=/tmp/model", "MODEL_PATH"),
    ("pebr_sample.sh", "data.train_files=my.json", "TRAIN_FILES"),
    ("pebr_sample_cpu.sh", "trainer.sample_output=/tmp/r.jsonl", "ROLLOUTS"),
])
def test_an_override_the_recipe_uses_later_stops_it_naming_the_variable(recipe, override, variable):
    # PATH without python: the recipe must stop before it runs anything.
    proc = subprocess.run(["bash", os.path.join("examples", recipe), "trainer.max_steps=1", override], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    assert f"error: set {variable}=... instead of the override {override}" in proc.stderr
