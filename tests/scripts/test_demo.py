"""The shortened demo (tiny model, a step per RL stage) runs every stage end to end and writes its report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_demo_end_to_end(tmp_path):
    out = str(tmp_path / "demo")
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "demo.py"), "--profile", "quick", "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    with open(os.path.join(out, "results.md")) as f:
        table = f.read()
    for label in ("warm-up SFT", "stage 1", "stage 2"):
        assert f"| {label} |" in table
    assert os.path.getsize(os.path.join(out, "training_curves.png")) > 1000
    for stage in ("stage1", "stage2"):
        merged = [d for d in os.listdir(os.path.join(out, stage)) if d.startswith("global_step_")]
        assert merged and os.path.isfile(os.path.join(out, stage, merged[0], "actor", "huggingface", "model.safetensors"))
    # Rerunning skips every finished stage.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("skipped") >= 8, again.stdout[-2000:]
