"""The compute dtype a config name means on each kind of device."""

from __future__ import annotations

import pytest
import torch

from pebr.config import ConfigError
from pebr.utils.dtypes import pick_dtype, resolve_dtype


@pytest.mark.parametrize("name, device_type, cuda_bf16, expected", [
    ("auto", "cpu", False, torch.float32),
    ("auto", "cuda", True, torch.bfloat16),   # A100, H100
    ("auto", "cuda", False, torch.float32),   # V100, T4: no native bf16
    ("bf16", "cpu", False, torch.bfloat16),   # opt-in on CPU, whatever its flags
    ("bf16", "cuda", True, torch.bfloat16),
    ("fp32", "cuda", True, torch.float32),
    ("fp32", "cuda", False, torch.float32),
])
def test_each_name_on_each_kind_of_device(name, device_type, cuda_bf16, expected):
    assert pick_dtype(name, device_type, cuda_bf16) is expected


def test_bf16_on_a_card_without_it_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"worker.rollout.dtype=bf16: this GPU has no native bf16.*"
                                          r"set worker.rollout.dtype=fp32"):
        pick_dtype("bf16", "cuda", False, "worker.rollout.dtype")


def test_an_unknown_name_is_refused():
    with pytest.raises(ConfigError, match="must be one of auto, bf16, fp32"):
        pick_dtype("fp16", "cpu", False)


def test_this_machines_cpu_resolves_auto_to_fp32():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
