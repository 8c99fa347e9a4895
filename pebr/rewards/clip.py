"""Image-caption cosine similarity with a CLIP-family model (FG-CLIP in the paper).

`ClipScorer` loads a transformers CLIP-family model, its tokenizer and its image processor from a
local directory once, then scores whole batches. It knows nothing of Ray: `pebr.workers.reward`
wraps it in a shared actor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

__all__ = ["ClipScorer"]


def _features(output: object) -> torch.Tensor:
    """Projected embeddings from get_{image,text}_features.

    CLIP in transformers >= 5 returns a model output whose pooler_output is the projection;
    remote-code models such as FG-CLIP return the tensor itself.
    """
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"cannot find embeddings in the model's output of type {type(output).__name__}")
    return pooled


class ClipScorer:
    """Cosine similarity between images and captions.

    Args:
        model_path: local directory with a CLIP-family model saved by `save_pretrained`, its
            tokenizer and its image processor.
        device: torch device; default "cuda" when available, else "cpu".
        dtype: parameter dtype; default bfloat16 on CUDA, float32 on CPU.
        max_text_length: caption length limit in tokens; default the text model's
            max_position_embeddings (77 for CLIP, 248 for FG-CLIP).
        batch_size: images per forward pass (bounds memory for large batches).
        trust_remote_code: passed to transformers; needed for FG-CLIP's own modelling code. Off by
            default so that a path never runs code unless asked.

    Raises:
        FileNotFoundError: if model_path is not a directory.
    """

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_text_length: int | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
    ) -> None:
        # Imported here so that importing this module stays cheap.
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"CLIP model directory not found: {model_path!r} (clip_model_path)")
        self.model_path = model_path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        self.image_processor = AutoImageProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if max_text_length is None:
            text_config = getattr(self.model.config, "text_config", self.model.config)
            max_text_length = int(text_config.max_position_embeddings)
        self.max_text_length = max_text_length
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        """Cosine similarity of each image with its caption.

        Args:
            images: N PIL images (any mode; converted to RGB, resized by the model's processor).
            captions: N captions; each is truncated to `max_text_length` tokens.

        Returns:
            N floats in [-1, 1].

        Raises:
            ValueError: if the two lists differ in length.
        """
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            scores.extend(self._score_batch(images[start:stop], captions[start:stop]))
        return scores

    def _score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> list[float]:
        pixels = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        text = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        pixel_values = pixels["pixel_values"].to(self.device, dtype=self.model.dtype)
        image_emb = _features(self.model.get_image_features(pixel_values=pixel_values))  # (N, D)
        text_emb = _features(
            self.model.get_text_features(
                input_ids=text["input_ids"].to(self.device),
                attention_mask=text["attention_mask"].to(self.device),
            )
        )  # (N, D)
        cosine = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)  # (N,)
        return cosine.cpu().tolist()
