"""Helpers for fault-injection tests: run the real programs as process groups, watch them, kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Callable

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The child starts its own local Ray (RAY_ADDRESS empty), never the test session's cluster.
CHILD_ENV = {"RAY_ADDRESS": "", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
             "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "offline", "RAY_USAGE_STATS_ENABLED": "0"}
# Files a checkpoint may hold; anything else could be a pickle.
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2, torch.save's zip container


def trainer_argv(model_dir: str, data_dir: str, run_dir: str, steps: int) -> list[str]:
    """The CPU GRPO recipe of tests/trainer/test_grpo_e2e.py at its smallest."""
    return [
        f"config={ROOT}/examples/pebr_stage2.yaml", f"config={ROOT}/examples/pebr_cpu.yaml",
        f"worker.actor.model.model_path={model_dir}", f"data.train_files={data_dir}/train.json",
        f"data.image_dir={data_dir}/images",
        f"worker.reward.reward_function={ROOT}/examples/reward_function/pebr_2.py:compute_score",
        "data.max_response_length=16", f"trainer.max_steps={steps}", "trainer.save_freq=1", "trainer.save_limit=2",
        "trainer.save_rollouts=true", "trainer.val_freq=-1", f"trainer.save_checkpoint_path={run_dir}",
    ]


def start(module: str, argv: list[str], log_path: str) -> subprocess.Popen:
    """`python -m module argv...` in its own session (process group), output to log_path."""
    log = open(log_path, "a")
    return subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env={**os.environ, **CHILD_ENV},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_until(what: str, cond: Callable[[], bool], proc: subprocess.Popen | None, timeout: float,
               poll: float = 0.002) -> float:
    """Poll `cond` until true; returns the seconds waited. Fails if `proc` exits first or on timeout."""
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the program exited (rc={proc.returncode}) before: {what}")
        if time.time() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(poll)
    return time.time() - t0


_NAMES: dict[int, str] = {}


def descendants(pid: int) -> list[psutil.Process]:
    """The processes `pid` started, directly or not (their names are remembered for reports after they die)."""
    procs = psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            _NAMES[p.pid] = p.name()
        except psutil.NoSuchProcess:
            pass
    return procs


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(procs: list[psutil.Process], timeout: float, since: float | None = None) -> dict[str, float | None]:
    """Seconds (from `since`) after which each process was seen gone; None for those alive at the timeout."""
    since = time.time() if since is None else since
    names = {p.pid: f"{_NAMES.get(p.pid, '?')}[{p.pid}]" for p in procs}
    gone: dict[int, float] = {}
    while True:  # at least one look, even when the deadline has passed already
        for p in procs:
            if p.pid not in gone and not _alive(p):
                gone[p.pid] = round(time.time() - since, 2)
        if len(gone) == len(procs) or time.time() - since > timeout:
            break
        time.sleep(0.1)
    return {names[p.pid]: gone.get(p.pid) for p in procs}


def sigkill(proc: subprocess.Popen, group: bool) -> float:
    """SIGKILL the program (only its main process, or its whole process group); returns the kill time."""
    t = time.time()
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return t


def pickle_like_files(root: str) -> list[str]:
    """Files under root that are not safetensors/JSON/text: pickles, torch.save archives, unknown binaries.

    A .safetensors file must open as safetensors and a .json file must parse; any other file must not
    start like a pickle (protocol >= 2) or a torch.save zip, nor carry a pickle-ish extension.
    """
    import json

    from safetensors import safe_open

    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if name.endswith(".safetensors"):
                    with safe_open(path, "pt") as f:
                        list(f.keys())
                    continue
                if name.endswith(".json"):
                    with open(path) as f:
                        json.load(f)
                    continue
            except Exception:  # noqa: BLE001 - unreadable as what it claims to be
                found.append(os.path.relpath(path, root))
                continue
            with open(path, "rb") as f:
                head = f.read(4)
            if head.startswith(PICKLE_MAGIC) or name.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")):
                found.append(os.path.relpath(path, root))
    return found
