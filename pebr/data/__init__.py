"""RL prompt data: record loading and validation, the format prompt, the prompt data set, and a resumable batch
sampler.

`records`, `images` and `prompts` need no torch; `dataset` and `sampler` import torch (and the data set needs a
processor). Import the pieces from their modules or from here.
"""

from pebr.data.records import DataError, LoadReport, load_records, normalize_record

__all__ = [
    "DataError",
    "LoadReport",
    "RLDataset",
    "StatefulBatchSampler",
    "collate_fn",
    "fit_size",
    "load_image",
    "load_records",
    "normalize_record",
]


def __getattr__(name: str) -> object:
    # Lazy so that `from pebr.data import load_records` does not import torch.
    if name == "RLDataset":
        from pebr.data.dataset import RLDataset

        return RLDataset
    if name in ("StatefulBatchSampler", "collate_fn"):
        from pebr.data import sampler

        return getattr(sampler, name)
    if name in ("fit_size", "load_image"):
        from pebr.data import images

        return getattr(images, name)
    raise AttributeError(f"module 'pebr.data' has no attribute {name!r}")
