"""Image-caption cosine similarity with a CLIP-family model (FG-CLIP in the paper).

`ClipScorer` loads a transformers CLIP-family model, its tokenizer and its image processor once, then
scores whole batches. It knows nothing of Ray: `pebr.workers.reward` wraps it in a shared actor.

FG-CLIP differs from transformers' CLIP in ways the scorer handles here rather than in the reward file:
its modelling code ships with the checkpoint (`trust_remote_code`, and its `auto_map` may name another
auto class than `AutoModel`), its features are plain tensors, its `get_text_features` takes no
attention mask, and it has two position tables: 77 "short" positions and 248 long ones, chosen with
`walk_short_pos`. The paper scores captions of up to 248 tokens, so the long table is used whenever
the scorer's caption limit is over 77 tokens.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from pebr.config import looks_like_model_id
from pebr.utils.dtypes import resolve_dtype

__all__ = ["ClipScorer", "resolve_model_dir", "SHORT_TEXT_POSITIONS"]

# Positions of CLIP's original text tower; FG-CLIP keeps them as its "short" table.
SHORT_TEXT_POSITIONS = 77


def resolve_model_dir(path: str, key: str = "clip_model_path") -> str:
    """A local directory holding the model `path` names.

    `path` is a directory, or a hub id ("org/name") whose snapshot is fetched, or taken from the local
    Hugging Face cache when the machine is offline (HF_HUB_OFFLINE=1).

    Raises:
        FileNotFoundError: naming `key`, when `path` is neither a directory nor a hub id this
            machine can fetch or find in its cache.
    """
    expanded = os.path.expanduser(path)
    if os.path.isdir(expanded):
        return expanded
    if not looks_like_model_id(path):
        raise FileNotFoundError(f"CLIP model directory not found: {path!r} ({key})")
    from huggingface_hub import snapshot_download  # imported here: only hub ids need it

    try:
        return snapshot_download(path)
    except Exception as exc:  # offline without a cached copy, no such repo, network errors
        raise FileNotFoundError(
            f"{key}={path!r} is not a local directory, and the hub model of that name could not be fetched "
            f"or found in the Hugging Face cache ({type(exc).__name__}: {exc}). Download it where the "
            f"network is reachable (hf download {path} --local-dir DIR) and set {key}=DIR"
        ) from exc


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


def _auto_model_class(model_dir: str, trust_remote_code: bool) -> Any:
    """The transformers auto class that loads the checkpoint: `AutoModel`, unless the checkpoint's
    remote code registers its model under another one only (FG-CLIP's card loads it with
    `AutoModelForCausalLM`)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    registered = [name for name in (getattr(config, "auto_map", None) or {}) if name.startswith("AutoModel")]
    if not trust_remote_code or not registered or "AutoModel" in registered:
        return transformers.AutoModel
    return getattr(transformers, registered[0])


def _accepts(method: Any, name: str) -> bool:
    parameters = inspect.signature(method).parameters
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


class ClipScorer:
    """Cosine similarity between images and captions.

    Args:
        model_path: local directory with a CLIP-family model saved by `save_pretrained`, its
            tokenizer and its image processor, or a hub id (see `resolve_model_dir`).
        device: torch device; default "cuda" when available, else "cpu".
        dtype: parameter dtype; default bfloat16 on a CUDA card that has it, else float32.
        max_text_length: caption length limit in tokens; default the text model's
            max_position_embeddings (77 for CLIP, 248 for FG-CLIP).
        batch_size: images per forward pass (bounds memory for large batches).
        trust_remote_code: passed to transformers; needed for FG-CLIP's own modelling code. Off by
            default so that a path never runs code unless asked.
        image_size: when set, each image is resized to image_size x image_size before the model's
            processor, so the whole image is scored (the paper resizes to 336); when None, the
            processor's own resize and centre crop apply, which cut the sides of a non-square image.

    Raises:
        FileNotFoundError: if model_path is neither a directory nor a reachable hub id.
    """

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_text_length: int | None = None,
        batch_size: int = 32,
        trust_remote_code: bool = False,
        image_size: int | None = None,
    ) -> None:
        # Imported here so that importing this module stays cheap.
        from transformers import AutoImageProcessor, AutoTokenizer

        if image_size is not None and image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.model_path = model_path
        model_dir = resolve_model_dir(model_path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = resolve_dtype("auto", self.device)
        auto_class = _auto_model_class(model_dir, trust_remote_code)
        self.model = auto_class.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        text_config = getattr(self.model.config, "text_config", self.model.config)
        positions = int(text_config.max_position_embeddings)
        if max_text_length is None:
            max_text_length = positions
        elif not 2 <= max_text_length <= positions:
            raise ValueError(f"max_text_length={max_text_length} (clip_max_text_length): the CLIP model at "
                             f"{model_path!r} takes 2 to {positions} tokens")
        self.max_text_length = max_text_length
        self.batch_size = batch_size
        self.image_size = image_size
        # Keyword arguments of get_text_features beyond input_ids, by what the model's signature takes.
        self.text_kwargs: dict[str, Any] = {}
        if _accepts(self.model.get_text_features, "walk_short_pos"):
            self.text_kwargs["walk_short_pos"] = max_text_length <= SHORT_TEXT_POSITIONS
        self.pass_attention_mask = _accepts(self.model.get_text_features, "attention_mask")

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
        if not images:
            return []
        # A prompt's n responses share its image object: each distinct image is prepared and encoded once (it was
        # once per response, n times the vision tower's work).
        slot: dict[int, int] = {}  # id(image) -> its row among the distinct images
        distinct: list[Image.Image] = []
        for image in images:
            if id(image) not in slot:
                slot[id(image)] = len(distinct)
                distinct.append(image)
        image_emb = torch.cat([self.encode_images(distinct[i:i + self.batch_size])
                               for i in range(0, len(distinct), self.batch_size)])
        text_emb = torch.cat([self.encode_texts(captions[i:i + self.batch_size])
                              for i in range(0, len(captions), self.batch_size)])
        rows = torch.tensor([slot[id(image)] for image in images], device=image_emb.device)
        return torch.nn.functional.cosine_similarity(image_emb[rows], text_emb, dim=-1).cpu().tolist()

    def _prepare(self, image: Image.Image) -> Image.Image:
        from pebr.data.images import to_rgb

        # Transparency laid on white and 16-bit greys scaled, as the policy saw the image (a plain RGB conversion
        # made a drawing on a transparent background black).
        return to_rgb(image, None if self.image_size is None else (self.image_size, self.image_size))

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image], captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected embeddings of N images and N captions, as the model gives them (not normalised).

        Returns:
            (image_emb, text_emb), each (N, D) float32 on the scorer's device.
        """
        return self.encode_images(images), self.encode_texts(captions)

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected embeddings (N, D) of N images, float32 on the scorer's device (not normalised)."""
        pixels = self.image_processor(images=[self._prepare(image) for image in images], return_tensors="pt")
        pixel_values = pixels["pixel_values"].to(self.device, dtype=self.model.dtype)
        return _features(self.model.get_image_features(pixel_values=pixel_values)).float()

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Projected embeddings (N, D) of N captions, each truncated to `max_text_length` tokens."""
        text = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        text_kwargs = dict(self.text_kwargs)
        if self.pass_attention_mask:
            text_kwargs["attention_mask"] = text["attention_mask"].to(self.device)
        return _features(self.model.get_text_features(input_ids=text["input_ids"].to(self.device), **text_kwargs)).float()
