"""Open, check and resize record images (one rule for training, rollout and sampling).

Qwen2.5-VL cuts an image into 14-px patches and merges 2x2 of them into one token, so an image
whose sides are multiples of 28 px maps to whole tokens. `fit_size` picks such a size inside
[min_pixels, max_pixels] keeping the aspect ratio; the resized image then passes through the
processor's own resize unchanged whenever the processor's bounds contain ours.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from PIL import Image, UnidentifiedImageError

from pebr.data.records import BadRecord

PATCH_MULTIPLE = 28  # 14-px patches, merged 2x2
# A source image above this many pixels is refused at load time: decoding it would take gigabytes in
# every worker that reads it (PIL itself refuses twice its own limit as a "decompression bomb").
MAX_SOURCE_PIXELS = 100_000_000


def fit_size(
    width: int, height: int, min_pixels: int | None = None, max_pixels: int | None = None
) -> tuple[int, int]:
    """The (width, height) to resize to: sides multiples of 28 px (at least 28), area within bounds.

    The sides are first rounded to the nearest multiple of 28; if the area is then above
    `max_pixels` both sides are scaled down by the same factor and floored, if below `min_pixels`
    scaled up and ceiled, so the aspect ratio is kept up to the rounding.

    Args:
        width, height: the original size in pixels (> 0).
        min_pixels, max_pixels: area bounds; None means unbounded on that side.

    Returns:
        (new_width, new_height), both multiples of 28 and >= 28.

    Raises:
        ValueError: a side is not positive, or min_pixels > max_pixels.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    step = PATCH_MULTIPLE
    new_w = max(step, round(width / step) * step)
    new_h = max(step, round(height / step) * step)
    if max_pixels is not None and new_w * new_h > max_pixels:
        scale = math.sqrt(width * height / max_pixels)
        new_w = max(step, math.floor(width / scale / step) * step)
        new_h = max(step, math.floor(height / scale / step) * step)
    elif min_pixels is not None and new_w * new_h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        new_w = math.ceil(width * scale / step) * step
        new_h = math.ceil(height * scale / step) * step
    return new_w, new_h


def _source_name(image: Any) -> str:
    if isinstance(image, str):
        return image
    if isinstance(image, (bytes, bytearray)):
        return f"<{len(image)} bytes>"
    return f"<{type(image).__name__}>"


def resolve_path(image: str, image_dir: str | None) -> str:
    """Join a relative path to `image_dir`; absolute paths (and no image_dir) are kept."""
    if image_dir is None or os.path.isabs(image):
        return image
    return os.path.join(image_dir, image)


def probe_image(image: Any, image_dir: str | None, where: str) -> tuple[int, int]:
    """Check that an image is there and readable, cheaply, and return its (width, height).

    Reads the header and runs PIL's `verify` (structure and checksums for PNG) without decoding the
    pixels, so missing, empty and truncated files fail at load time and not inside a worker.

    Args:
        image: a path (str), raw bytes, or a PIL image (as `normalize_record` leaves them).
        image_dir: directory that relative paths are joined to.
        where: how to name the record in messages.

    Returns:
        (width, height) of the stored image.

    Raises:
        BadRecord: reason "image_missing", "image_unreadable" or "image_too_large", naming the record and
            the path.
    """
    if isinstance(image, Image.Image):
        width, height = image.size
    else:
        if isinstance(image, str):
            path = resolve_path(image, image_dir)
            if not os.path.isfile(path):
                raise BadRecord("image_missing", f"{where}: image file {path!r} does not exist")
            if os.path.getsize(path) == 0:
                raise BadRecord("image_unreadable", f"{where}: image file {path!r} is empty (0 bytes)")
            name: str = path
        else:
            name = _source_name(image)
        try:
            with _open(image, image_dir) as opened:
                width, height = opened.size
                if width * height > MAX_SOURCE_PIXELS:
                    raise BadRecord("image_too_large", f"{where}: image {name!r} is {width}x{height} pixels, more "
                                    f"than {MAX_SOURCE_PIXELS} (pebr.data.images.MAX_SOURCE_PIXELS)")
                opened.verify()
        except BadRecord:
            raise
        except Image.DecompressionBombError as err:
            raise BadRecord("image_too_large", f"{where}: image {name!r} is too large to decode: {err}") from err
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            # PIL signals broken files with all of these (SyntaxError for bad PNG chunks).
            raise BadRecord("image_unreadable", f"{where}: image {name!r} cannot be read: {err}") from err
    if width <= 0 or height <= 0:
        raise BadRecord("image_unreadable", f"{where}: image {_source_name(image)!r} has size {width}x{height}")
    return width, height


def _open(image: Any, image_dir: str | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(resolve_path(image, image_dir))


def load_image(
    image: Any, image_dir: str | None, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image, convert it to RGB and resize it with `fit_size`.

    Args:
        image: a path (joined to `image_dir` unless absolute), raw bytes, or a PIL image.
        image_dir: directory for relative paths.
        min_pixels, max_pixels: area bounds for `fit_size`.

    Returns:
        A new RGB PIL image whose sides are multiples of 28.

    Raises:
        OSError / PIL.UnidentifiedImageError: the image cannot be decoded.
    """
    opened = _open(image, image_dir)
    try:
        rgb = opened.convert("RGB")  # forces the full decode; the file handle is released below
    finally:
        if opened is not image:
            opened.close()
    size = fit_size(rgb.width, rgb.height, min_pixels, max_pixels)
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb
