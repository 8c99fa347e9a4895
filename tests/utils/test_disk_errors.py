"""A full disk, or a file-size limit, while the project writes: the error names the file being written, what was
there before stays whole, and the entry points say it without a traceback. /dev/full and RLIMIT_FSIZE give the
real OS errors (ENOSPC, EFBIG) without a small file system to fill."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from pebr.utils.jsonio import append_durably, write_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_full_disk_names_the_file_and_its_free_space() -> None:
    with pytest.raises(OSError) as info:
        append_durably("/dev/full", b'{"step": 1}\n')
    assert info.value.errno == errno.ENOSPC and info.value.filename == "/dev/full"
    assert "No space left on device (" in str(info.value) and " MiB free there)" in str(info.value)
    # safetensors says the OS error in its text alone: the errno is read from it.
    named = write_error(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                        "/tmp/x/model.safetensors")
    assert named.errno == errno.ENOSPC and named.filename == "/tmp/x/model.safetensors"


def run_limited(tmp_path, body: str, limit: int = 4096) -> subprocess.CompletedProcess:
    """`body` in a Python process whose files may not grow past `limit` bytes (EFBIG past it)."""
    script = tmp_path / "limited.py"
    script.write_text("import resource, signal\n"
                      "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                      f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n" + textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})


def test_a_report_and_its_table_are_written_together_or_not_at_all(tmp_path) -> None:
    """The evaluation report's JSON was replaced, then its table failed: a new report beside an old table."""
    for name in ("eval.json", "eval.md"):
        (tmp_path / name).write_text("old")
    res = run_limited(tmp_path, f"""
        from pebr.utils.jsonio import atomic_write_texts
        try:
            atomic_write_texts({{{str(tmp_path / 'eval.json')!r}: "new", {str(tmp_path / 'eval.md')!r}: "x" * 10000}})
        except OSError as err:
            print(err.errno, err.filename)
    """)
    assert res.stdout.split() == [str(errno.EFBIG), str(tmp_path / "eval.md")], res.stderr
    assert (tmp_path / "eval.json").read_text() == (tmp_path / "eval.md").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["eval.json", "eval.md", "limited.py"]  # no temporary file left


def test_a_checkpoint_shard_that_cannot_be_written_names_its_file_and_leaves_no_part(tmp_path) -> None:
    """safetensors' error named no file, and its cut temporary file stayed on the disk it had filled."""
    actor = tmp_path / "global_step_1.partial" / "actor"
    res = run_limited(tmp_path, f"""
        import torch
        from pebr import checkpoint
        model = torch.nn.Linear(64, 64)
        try:
            checkpoint.save_sharded({str(actor)!r}, model, torch.optim.AdamW(model.parameters()), None, 0, 1)
        except OSError as err:
            print(err.errno, err.filename)
    """)
    assert res.stdout.split() == [str(errno.EFBIG), str(actor / "model_world_size_1_rank_0.safetensors")], res.stderr
    assert os.listdir(actor) == []


def test_an_entry_point_says_a_full_disk_without_a_traceback(capsys) -> None:
    from pebr.cli import run_cli

    def writes_a_log(argv: list[str]) -> None:
        append_durably("/dev/full", json.dumps({"step": 1}).encode())

    assert run_cli(writes_a_log, [], on_interrupt="the same command goes on") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: [Errno 28] No space left on device (") and "'/dev/full'" in err
    assert err.rstrip().endswith("once there is room, the same command goes on") and "Traceback" not in err
