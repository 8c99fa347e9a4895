"""Metric loggers: console, a JSONL file in the run directory, wandb, tensorboard.

The JSONL file is the record a resumed run continues: on resume, lines for steps after the
checkpoint's step are dropped, so a step is never logged twice. A resumed run logs to the same wandb run, which
cannot drop steps: those an earlier run logged past the checkpoint keep its values there (the run warns).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any

from pebr.config import LOGGERS
from pebr.utils.jsonio import append_durably, atomic_write_text


class MetricsFile:
    def __init__(self, path: str, resume_step: int):
        self.path = path
        self.steps: set[int] = set()  # the steps logged so far
        self.last_dropped = 0  # the last step an earlier run logged past resume_step (0: none)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            kept = []
            with open(path) as f:
                for line in f:
                    try:
                        # A run that restarts from step 0 logs everything again, step 0's validation included.
                        step = json.loads(line).get("step", 0)
                        if resume_step and step <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                            self.steps.add(step)
                        else:
                            self.last_dropped = max(self.last_dropped, step)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a crash
            atomic_write_text(path, "".join(kept))

    def drop_validation(self, step: int) -> None:
        """Remove the lines of `step` that hold validation metrics only (an earlier trainer.val_only run's)."""
        if not os.path.exists(self.path):  # validation alone in a new run directory: nothing logged before
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if not _validation_only(json.loads(line), step)]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.steps.add(step)
        # Strict JSON (jq, pandas, JavaScript): a non-finite value is written as null, not NaN / Infinity.
        row = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        append_durably(self.path, (json.dumps({"step": step, **row}) + "\n").encode("utf-8"))


def _validation_only(row: dict[str, Any], step: int) -> bool:
    return row.get("step") == step and all(k in ("step", "timing/validate_s") or k.startswith("val/") for k in row)


def wandb_run_id(run_dir: str, resume_step: int) -> str:
    """The wandb run of this run directory: the one saved there when resuming, so that the curves continue in
    one run; a new one (saved for later resumes) when the run starts at step 0."""
    path = os.path.join(run_dir, "wandb_run_id")
    if resume_step and os.path.isfile(path):
        with open(path) as f:
            saved = f.read().strip()
        if saved:
            return saved
    run_id = uuid.uuid4().hex[:12]
    atomic_write_text(path, run_id + "\n")
    return run_id


class Tracker:
    """Fans metrics out to the configured back-ends (`trainer.logger`)."""

    def __init__(self, backends: list[str], run_dir: str, project: str, experiment: str, config: dict,
                 resume_step: int):
        unknown = sorted(set(backends) - set(LOGGERS))  # the trainer's config check says so before any work
        if unknown:
            raise ValueError(f"trainer.logger: unknown back-ends {unknown}; choose from {list(LOGGERS)}")
        self.console = "console" in backends
        self._logged_step_path = os.path.join(run_dir, "logged_step")
        logged_before = self._logged_step()  # (read before this run writes it)
        self.file = MetricsFile(os.path.join(run_dir, "metrics.jsonl"), resume_step) if "file" in backends else None
        self.wandb = self.tb = None
        if "wandb" in backends:
            import wandb

            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
            self.wandb = wandb.init(project=project, name=experiment, config=config, dir=run_dir, mode=mode,
                                    id=wandb_run_id(run_dir, resume_step), resume="allow")
            last = self.file.last_dropped if self.file is not None else logged_before
            if resume_step and last > resume_step:
                print(f"warning: the wandb run already holds steps {resume_step + 1}..{last}, logged by the run "
                      f"before this resume from step {resume_step}; wandb takes steps in increasing order only, so "
                      f"it drops this run's metrics up to step {last} and shows the earlier run's there "
                      "(metrics.jsonl and TensorBoard hold this run's)", flush=True)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run logs its steps again from resume_step + 1: TensorBoard drops what an earlier run
            # logged from there on (metrics.jsonl is trimmed the same way), instead of showing two values a step.
            # A run that starts at step 0 logs step 0's validation again: everything goes.
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step else 0)

    def missing(self, step: int) -> bool:
        """Whether `step` was never logged: metrics.jsonl has no line for it, or, without the file back-end, the
        run directory's `logged_step` is behind it (TensorBoard and wandb cannot be asked; a run that saved a
        step and died before logging it used to leave that step out of them for good)."""
        if self.file is not None:
            return step not in self.file.steps
        return self._logged_step() < step

    def _logged_step(self) -> int:
        """The last step logged, as the run directory's `logged_step` says (-1: none; kept without the file
        back-end only)."""
        try:
            with open(self._logged_step_path) as f:
                return int(f.read())
        except (OSError, ValueError):
            return -1

    def log(self, step: int, metrics: dict[str, Any], replace_validation: bool = False) -> None:
        """Log `step`'s metrics; `replace_validation`: drop an earlier validation-only line of the step from
        metrics.jsonl first (trainer.val_only run again at one checkpoint appended a line each time)."""
        metrics = {k: float(v) for k, v in metrics.items()}
        if self.file:
            if replace_validation:
                self.file.drop_validation(step)
            self.file.log(step, metrics)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if not self.file:
            atomic_write_text(self._logged_step_path, f"{step}\n")
        if self.console:
            keys = ("reward/overall", "reward/accuracy", "response/length_mean", "actor/pg_loss", "actor/kl_loss",
                    "actor/grad_norm", "timing/step_s", "val/overall")
            # The last part of a key, but validation keys whole: "overall" twice on a validation step told nothing.
            shown = "  ".join(f"{k if k.startswith('val/') else k.split('/')[-1]}={metrics[k]:.4g}"
                              for k in keys if k in metrics)
            print(f"step {step}: {shown}", flush=True)

    def close(self) -> None:
        if self.wandb:
            self.wandb.finish()
        if self.tb:
            self.tb.close()
