"""PeBR-R1: Perception Before Reasoning, two-stage GRPO for vision-language models."""

__version__ = "0.1.0"
