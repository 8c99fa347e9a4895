"""How every command line of the project ends: one message on stderr and an exit code, no traceback for what
the user can fix.

    exit 0    done
    exit 1    a worker died or raised (its own traceback is in the log above), or a full or read-only disk
    exit 2    the user's input: a setting, a data file, a checkpoint, an output folder (a `UserError`)
    exit 130  Ctrl-C;  exit 143  SIGTERM (a scheduler stopping the job)

Every entry point runs its work through `run_cli`, whose return value is its exit code. This module imports
nothing heavy, so that light scripts (dataset/filter.py, the split) can use it without loading torch or Ray.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

RESUMES = "the same command continues from the last complete checkpoint or output"


class UserError(Exception):
    """Input the user can fix; the message names the file, record or key. `label` starts its line on stderr."""

    label = "error"


class WorkerFailure(RuntimeError):
    """A Ray worker died or raised; the message names it."""


class WorkerTimeout(WorkerFailure):
    """A Ray worker gave no answer within trainer.worker_timeout_s."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler stopping the job), raised in the driver's main thread: the run ends as on Ctrl-C."""


def run_cli(run_fn: Callable[[list[str]], Any], argv: list[str] | None, usage: str | None = None,
            on_interrupt: str = RESUMES) -> int:
    """Run an entry point and return its exit code (module docstring). `on_interrupt` says what a rerun does,
    after Ctrl-C, SIGTERM or a full disk; `usage` is printed for -h / --help, for entry points that take
    key=value words rather than options (argparse ones print their own). What `run_fn` returns is not used."""
    from pebr.utils.jsonio import DISK_ERRNOS

    argv = sys.argv[1:] if argv is None else argv
    if usage is not None and any(word in ("-h", "--help") for word in argv):
        print(usage)
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_fn(argv)
    except UserError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        return 2
    except WorkerFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        print(f"error: {e}; once there is room, {on_interrupt}", file=sys.stderr)  # (what a rerun does)
        return 1
    except Terminated:
        print(f"terminated (SIGTERM); {on_interrupt}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"interrupted; {on_interrupt}", file=sys.stderr)
        return 130
    return 0
