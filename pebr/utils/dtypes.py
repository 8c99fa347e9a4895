"""Which floating-point type a model computes in, from a config name and the device it runs on."""

from __future__ import annotations

import torch

from pebr.config import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def pick_dtype(name: str, device_type: str, cuda_bf16: bool, key: str = "dtype") -> torch.dtype:
    """The dtype that config value `name` ("auto", "bf16" or "fp32") means on a device.

    'auto' is bf16 on a CUDA card that computes it natively (compute capability 8.0 and later) and fp32 anywhere
    else: on CPU bf16 is opt-in (measured in benchmarks/), and on older cards (V100, T4) torch would emulate it
    slowly and vLLM refuses it. An explicit 'bf16' on such a card is refused here, before minutes of model loading.

    Args:
        name: the config value.
        device_type: "cuda" or "cpu".
        cuda_bf16: whether the CUDA card has native bf16 (ignored on CPU).
        key: the config key, for the error message.

    Raises:
        ConfigError: 'bf16' on a CUDA card without native bf16, or an unknown name.
    """
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" and cuda_bf16 else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"{key}={name!r}: must be one of auto, {', '.join(DTYPES)}")
    if name == "bf16" and device_type == "cuda" and not cuda_bf16:
        raise ConfigError(f"{key}=bf16: this GPU has no native bf16 (it needs compute capability 8.0 or later, "
                          f"e.g. an A100 or H100); set {key}=fp32, or auto, which picks fp32 on this card")
    return DTYPES[name]


def resolve_dtype(name: str, device: torch.device | str, key: str = "dtype") -> torch.dtype:
    """`pick_dtype` for a real device: asks the current CUDA card whether it has native bf16."""
    device_type = torch.device(device).type
    cuda_bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return pick_dtype(name, device_type, cuda_bf16, key)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, with the dtype its config saves said the same in every sub-config: `save_pretrained`
    rewrites only the top-level one, and a model loaded in fp32 keeps `text_config.dtype: float32` and
    `vision_config.dtype: float32` beside a top-level `bfloat16`, which loaders reading a sub-config take at
    their word."""
    model = model.to(dtype)
    config = getattr(model, "config", None)
    if config is not None:
        config.dtype = dtype
        for name in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, name, None)
            if sub is not None and hasattr(sub, "dtype"):
                sub.dtype = dtype
    return model
