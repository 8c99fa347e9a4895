"""Session fixtures: the embedded tiny model and data set are built once per test session."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# vLLM on CPU: a small KV cache, and the engine in-process so that tests see its errors directly.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from pebr.utils.tiny_model import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")), size="tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> str:
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_synthetic_data import build_dataset

    out = str(tmp_path_factory.mktemp("synthetic"))
    build_dataset(out, num=40, seed=0, test_fraction=0.2, image_size=56, sft_num=20)
    return out


@pytest.fixture(scope="session")
def ray_session():
    """Ray is started once per test session (it costs seconds) and shared by every test that needs it."""
    import ray

    if not ray.is_initialized():
        # Workers see the project first and keep the caller's PYTHONPATH (where Ray itself may live).
        pythonpath = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": pythonpath}})
    yield ray
    ray.shutdown()


def idle_cpus(ray, timeout: float = 60.0) -> float:
    """Wait until every CPU of the test cluster is free again (actors killed by an earlier test release theirs
    asynchronously), and return that number: a test can then check that it leaves the cluster as it found it."""
    import time

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + timeout
    while ray.available_resources().get("CPU", 0) < total and time.time() < deadline:
        time.sleep(0.2)
    return total


@contextlib.contextmanager
def lock_held_elsewhere(lock_path: str) -> Iterator[int]:
    """`lock_path` held (`pebr.utils.jsonio.exclusive_lock`) by another process for the block; yields its pid."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from pebr.utils.jsonio import exclusive_lock\n"
        f"with exclusive_lock({lock_path!r}, RuntimeError):\n    print('held', flush=True); time.sleep(300)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="session")
def coarse_tokenizer_dir(tiny_model_dir, tmp_path_factory) -> str:
    """A tokenizer_path for the tiny model: its processor files, with the BPE merges cut to the first quarter,
    so that a prompt becomes other (more) token ids than with the model's own tokenizer. The ids stay within
    the model's vocabulary and the special tokens are kept."""
    import json
    import shutil

    out = str(tmp_path_factory.mktemp("coarse_tokenizer"))
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny_model_dir, name), out)
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        tokenizer = json.load(f)
    merges = tokenizer["model"]["merges"]
    tokenizer["model"]["merges"] = merges[: len(merges) // 4]
    with open(path, "w") as f:
        json.dump(tokenizer, f)
    return out
