"""StepProfiler: torch.profiler started and stopped in separate calls, its outputs complete files."""

from __future__ import annotations

import gzip
import json
import os

import pytest
import torch
from torch.profiler import record_function

from pebr.utils.profiling import StepProfiler


def test_records_between_start_and_stop_and_writes_trace_and_tables(tmp_path):
    profiler = StepProfiler(torch.device("cpu"))
    torch.randn(64, 64) @ torch.randn(64, 64)  # before start: not recorded
    profiler.start()
    with record_function("pebr/forward"):
        x = torch.randn(32, 48, requires_grad=True)
        (x @ torch.randn(48, 16)).sum().backward()
    written = profiler.stop(str(tmp_path / "step_3"), rank=1)
    assert written == [str(tmp_path / "step_3" / "rank1.trace.json.gz"), str(tmp_path / "step_3" / "rank1.ops.txt")]
    assert sorted(os.listdir(tmp_path / "step_3")) == ["rank1.ops.txt", "rank1.trace.json.gz"]  # no partial file left
    with gzip.open(written[0], "rt") as f:
        events = json.load(f)["traceEvents"]
    mms = [e for e in events if e.get("name") == "aten::mm"]
    assert any(e.get("name") == "pebr/forward" for e in events)
    # The forward product and the backward's one (only x needs a gradient); the product before `start` is not there.
    assert len(mms) == 2, [e.get("args", {}).get("Input Dims") for e in mms]
    text = open(written[1]).read()
    regions, rest = text.split("# rank 1, operators by self_cpu_time_total\n", 1)
    assert regions.splitlines()[0] == "# rank 1, the trainer's regions"
    assert regions.splitlines()[2].split()[:2] == ["pebr/forward", "1"]
    assert "aten::mm" in rest and "# rank 1, operators by self_cpu_time_total and input shapes" in rest
    assert "[32, 48], [48, 16]" in rest  # shapes recorded


def test_start_twice_or_stop_without_start_is_refused(tmp_path):
    profiler = StepProfiler(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="no profile is being recorded"):
        profiler.stop(str(tmp_path), rank=0)
    profiler.start()
    with pytest.raises(RuntimeError, match="already being recorded"):
        profiler.start()
    profiler.stop(str(tmp_path), rank=0)
    profiler.start()  # a second step can be profiled by the same worker
    profiler.stop(str(tmp_path / "again"), rank=0)
    assert os.path.isfile(tmp_path / "again" / "rank0.ops.txt")
