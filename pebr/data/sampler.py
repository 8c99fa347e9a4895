"""A batch sampler that can be saved and resumed mid-epoch.

The order of epoch `e` is a pure function of (seed, e): a permutation drawn from a torch.Generator
seeded with `seed + e`. The state is therefore three integers, and a run resumed from
`state_dict()` serves exactly the batches an uninterrupted run would have served next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)


class StatefulBatchSampler:
    """Yields lists of dataset indices, `batch_size` at a time, and remembers where it stopped.

    Iterating serves the rest of the current epoch (from `position`), then moves to the next epoch
    with `position` 0, so `for batch in sampler` once per epoch walks the epochs in turn.
    `position` counts batches handed out; it moves when a batch is yielded, so a state saved after
    a batch was processed resumes at the next batch. (A DataLoader with worker processes fetches
    indices ahead of the consumer: take the state where batches are consumed, or use num_workers=0.)

    Args:
        num_items: number of items in the data set (> 0).
        batch_size: items per batch (> 0).
        shuffle: draw a new permutation per epoch; otherwise 0..num_items-1 in order.
        seed: base seed; epoch `e` uses `seed + e`.
        drop_last: drop the last batch when it is smaller than `batch_size`. The default keeps it, so
            every item is served each epoch.
    """

    def __init__(
        self, num_items: int, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if drop_last and num_items < batch_size:
            raise ValueError(f"drop_last with batch_size={batch_size} > num_items={num_items} yields no batch")
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.num_items // self.batch_size
        return -(-self.num_items // self.batch_size)

    def epoch_order(self, epoch: int) -> list[int]:
        """The item order of `epoch` (a permutation when shuffling)."""
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; calling it with the current epoch keeps the position (resume)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            batch = order[start : start + self.batch_size]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int | bool]:
        """{"epoch", "position", "seed"} plus the settings that give `position` its meaning."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_items": self.num_items,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state: the next batch served is the first one not served before.

        The saved seed is adopted (with a warning when it differs from this sampler's), since the order
        depends on it.

        Raises:
            ValueError: a key is missing or negative, or the saved num_items / batch_size / shuffle / drop_last
                (when present) differ from this sampler's, which would make the saved position point elsewhere.
        """
        for key in ("epoch", "position", "seed"):
            if key not in state:
                raise ValueError(f"sampler state is missing key {key!r} (has {sorted(state)})")
        changed = {"num_items": "the data set", "batch_size": "the batch size", "shuffle": "data.shuffle",
                   "drop_last": "the drop-last setting"}
        for key, what in changed.items():
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state key {key!r} is {state[key]}, but this sampler has {getattr(self, key)}: "
                    f"{what} changed since the state was saved"
                )
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise ValueError(
                f"sampler state has epoch={epoch}, position={position}; expected 0 <= position <= {len(self)}"
            )
        if seed != self.seed:
            logger.warning("StatefulBatchSampler: resuming with the saved seed %d instead of %d", seed, self.seed)
        self.epoch, self.position, self.seed = epoch, position, seed


def collate_fn(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep a batch as a list of item dicts (prompts, PIL images and strings do not stack)."""
    return list(items)
