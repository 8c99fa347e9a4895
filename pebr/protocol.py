"""The one batch type that crosses process boundaries (controller <-> workers).

Schema of a rollout `Batch` of N samples (N = prompts x n responses):

    prompt_ids     list[list[int]]   the prompt tokens, image placeholders expanded (as the model sees them)
    response_ids   list[list[int]]   the generated tokens (no padding)
    images         list[list[Image]] the prompt's images (the same objects for all n responses of a prompt)
    non_tensors    dict[str, list]   per-sample values: uid (prompt group), qid, question, ground_truth, key_words,
                                     response (decoded text), prompt index, truncated (cut by the length limit)
    tensors        dict[str, Tensor] per-sample tensors with N as the first dimension, e.g. response_mask
                                     [N, T], old_logprobs [N, T], ref_logprobs [N, T], advantages [N, T],
                                     scores [N]; T is the longest response of the batch (right padding)

Token-level tensors are padded on the right to the batch's longest response; `response_mask`
marks real tokens. Ragged token lists are kept as lists so a batch costs what its tokens cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch


@dataclass
class Batch:
    prompt_ids: list[list[int]] = field(default_factory=list)
    response_ids: list[list[int]] = field(default_factory=list)
    images: list[list[Any]] = field(default_factory=list)
    non_tensors: dict[str, list] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.response_ids)

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        for name, values in [("prompt_ids", self.prompt_ids), ("images", self.images),
                             *self.non_tensors.items(), *self.tensors.items()]:
            if len(values) != n:
                raise ValueError(f"Batch field {name!r} has {len(values)} entries, expected {n}")

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.long)

    def response_mask(self) -> torch.Tensor:
        """[N, T] float mask of real response tokens, T = longest response."""
        lengths = self.response_lengths
        width = int(lengths.max()) if len(lengths) else 0
        return (torch.arange(width)[None, :] < lengths[:, None]).float()

    def image_groups(self) -> list[list[int]]:
        """Indices of the samples that share their image objects (the n responses of a prompt), each group in
        batch order, groups in order of first appearance; a sample without images is a group of its own.

        Sharing is by object identity, which survives `select` and pickling one batch (pickle keeps shared
        objects shared), so these are exactly the images `pebr.workers.actor.image_inputs` encodes once.
        """
        return _groups(tuple(id(im) for im in ims) if ims else ("no image", i)
                       for i, ims in enumerate(self.images))

    def prompt_groups(self) -> list[list[int]]:
        """Indices of the samples with the same prompt: equal prompt ids and the same image objects (as in
        `image_groups`), each group in batch order, groups in order of first appearance. A packed micro-batch
        with worker.actor.share_prompts lays each such prompt out once (`pebr.workers.actor.collate_packed`)."""
        return _groups((tuple(ids), tuple(id(im) for im in ims))
                       for ids, ims in zip(self.prompt_ids, self.images))

    def response_tensor(self, name: str) -> torch.Tensor:
        """`tensors[name]` as [N, longest response]: created as zeros, or widened with zeros, where needed."""
        width = int(self.response_lengths.max()) if len(self) else 0
        have = self.tensors.get(name)
        if have is None or have.shape[1] < width:
            full = torch.zeros(len(self), width)
            if have is not None:
                full[:, :have.shape[1]] = have
            self.tensors[name] = full
        return self.tensors[name]

    def select(self, indices: Sequence[int]) -> "Batch":
        """The samples at `indices`; token-level tensors cut to the longest of their responses (a dropped sample's
        longer response left them wider than the log-probs computed later for the selection)."""
        idx = list(indices)
        index = torch.tensor(idx, dtype=torch.long)
        response_ids = [self.response_ids[i] for i in idx]
        width = max(map(len, response_ids), default=0)
        return Batch(
            prompt_ids=[self.prompt_ids[i] for i in idx],
            response_ids=response_ids,
            images=[self.images[i] for i in idx],
            non_tensors={k: [v[i] for i in idx] for k, v in self.non_tensors.items()},
            tensors={k: v.index_select(0, index)[:, :width] if v.dim() > 1 else v.index_select(0, index)
                     for k, v in self.tensors.items()},
        )

    @staticmethod
    def concat(batches: Sequence["Batch"]) -> "Batch":
        batches = [b for b in batches if len(b)]
        if not batches:
            return Batch()
        tensor_keys, non_tensor_keys = set(batches[0].tensors), set(batches[0].non_tensors)
        for i, b in enumerate(batches[1:], 1):
            if set(b.tensors) != tensor_keys or set(b.non_tensors) != non_tensor_keys:
                raise ValueError(f"Batch.concat: batch {i} has tensors {sorted(b.tensors)} and non-tensors "
                                 f"{sorted(b.non_tensors)}, batch 0 {sorted(tensor_keys)} and {sorted(non_tensor_keys)}; "
                                 "batches must have the same keys")
        width = {k: max(b.tensors[k].shape[1] for b in batches) for k in tensor_keys if batches[0].tensors[k].dim() > 1}
        tensors = {}
        for k in tensor_keys:
            parts = [b.tensors[k] for b in batches]
            if k in width:  # token-level: pad on the right to the widest part
                parts = [torch.nn.functional.pad(p, (0, width[k] - p.shape[1])) for p in parts]
            tensors[k] = torch.cat(parts, dim=0)
        return Batch(
            prompt_ids=[p for b in batches for p in b.prompt_ids],
            response_ids=[r for b in batches for r in b.response_ids],
            images=[im for b in batches for im in b.images],
            non_tensors={k: [v for b in batches for v in b.non_tensors[k]] for k in batches[0].non_tensors},
            tensors=tensors,
        )


def _groups(keys: Iterable[Any]) -> list[list[int]]:
    """Indices of equal keys, each group in order, groups in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())
