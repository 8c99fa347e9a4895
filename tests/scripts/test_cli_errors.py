"""The command-line tools other than the trainer stop on bad input with their message and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("argv, message", [
    (["inference.py", "--model_path", "/nonexistent/model"], "--model_path '/nonexistent/model': no such directory"),
    (["scripts/evaluate.py", "--model_path", "./no/such/model", "--data", "x.json"],
     "--model_path './no/such/model': no such directory"),
    (["scripts/evaluate.py", "--model_path", "{model}", "--data", "/nonexistent/test.json"],
     "/nonexistent/test.json"),
    (["scripts/sft_warmup.py", "--model_path", "/nonexistent/model", "--data", "x.json", "--output_dir", "{tmp}"],
     "sft config: model_path '/nonexistent/model' is not a directory"),
])
def test_bad_input_exits_2_with_its_message_and_no_traceback(argv, message, tiny_model_dir, tmp_path):
    argv = [word.format(model=tiny_model_dir, tmp=tmp_path) for word in argv]
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
