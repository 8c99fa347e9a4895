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

from PIL import Image, ImageOps, UnidentifiedImageError

from pebr.data.records import BadRecord

PATCH_MULTIPLE = 28  # 14-px patches, merged 2x2
# A source image above this many pixels is refused at load time: decoding it would take gigabytes in
# every worker that reads it (PIL itself refuses twice its own limit as a "decompression bomb").
MAX_SOURCE_PIXELS = 100_000_000
# Image area bounds of the stage recipes (the paper's 576..802816), which SFT, evaluation and inference share,
# so a model sees its images at the resolution it was trained at.
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 576, 802816
# Formats whose pixel data PIL's verify() checks (PNG's chunk CRCs, WebP's chunk sizes), so a cut file fails the
# probe without being decoded; JPEG is probed by a reduced decode, every other format by a full one.
_VERIFIED_FORMATS = ("PNG", "WEBP")
# Qwen2.5-VL's processor refuses an image whose long side is more than this many times its short side.
MAX_ASPECT_RATIO = 200
# EXIF orientations that turn the image a quarter: its displayed width is the stored height.
_QUARTER_TURNS = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


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
        (new_width, new_height), both multiples of 28 and >= 28 (so the area exceeds max_pixels only
        when max_pixels is under 28 x 28).

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
        # A very thin image keeps its short side at 28 px, so the long side alone must give way.
        if new_w * new_h > max_pixels and new_h == step:
            new_w = max(step, max_pixels // step // step * step)
        elif new_w * new_h > max_pixels and new_w == step:
            new_h = max(step, max_pixels // step // step * step)
    elif min_pixels is not None and new_w * new_h < min_pixels:
        scale = math.sqrt(min_pixels / (width * height))
        new_w = math.ceil(width * scale / step) * step
        new_h = math.ceil(height * scale / step) * step
        # Rounding both sides up can pass max_pixels (min_pixels = max_pixels, a fixed resolution, always did):
        # the longer side gives way, and where no multiple of 28 meets both bounds, max_pixels wins.
        while max_pixels is not None and new_w * new_h > max_pixels and max(new_w, new_h) > step:
            if new_w >= new_h:
                new_w -= step
            else:
                new_h -= step
    return new_w, new_h


def check_fitted_aspect(width: int, height: int, where: str) -> None:
    """Refuse an image whose size after `fit_size` (not before: rounding a short side up to 28 px can push a
    ratio under 200 past it) is thinner than the processor takes.

    Raises:
        BadRecord: reason "image_aspect_ratio", "<where> becomes WxH px ...".
    """
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise BadRecord("image_aspect_ratio", f"{where} becomes {width}x{height} px within the pixel bounds, its "
                        f"long side more than {MAX_ASPECT_RATIO} times its short side, which the model's processor "
                        "refuses")


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
    pixels, so missing, empty and truncated files fail at load time and not inside a worker. A JPEG, which
    `verify` does not check, is decoded at an eighth of its size (its entropy-coded data is read whole, so a
    truncated file fails, at a fraction of a full decode's cost). A PNG without an eXIf chunk ahead of its
    pixels is decoded whole, by PIL, to find one after them (about 0.3 s and 250 MB at 8000 x 8000): the
    size returned is the displayed one, after the EXIF orientation that `load_image` applies.

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
        if _quarter_turned(image):
            width, height = height, width
    else:
        if isinstance(image, str):
            path = resolve_path(image, image_dir)
            if not os.path.isfile(path):
                what = "is a directory" if os.path.isdir(path) else "does not exist"
                if not os.path.isabs(image):  # say where a relative path was looked for: the usual mistake
                    what += (f" (a relative path, joined to the image directory {image_dir})" if image_dir is not None
                             else f" (a relative path, read from the working directory {os.getcwd()})")
                shown = path if len(path) <= 200 else f"{path[:100]}...({len(path)} characters)"
                raise BadRecord("image_missing", f"{where}: image file {shown!r} {what}")
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
                if opened.format == "JPEG":
                    turned = _quarter_turned(opened)
                    opened.draft("RGB", (max(1, opened.width // 8), max(1, opened.height // 8)))
                    opened.load()
                elif opened.format in _VERIFIED_FORMATS:
                    opened.verify()  # must come first after opening, so the EXIF is read from a second open
                    with _open(image, image_dir) as again:
                        turned = _quarter_turned(again)
                else:  # PIL's verify() reads none of these formats' pixel data (BMP, GIF, TIFF...): decode it
                    opened.load()
                    turned = _quarter_turned(opened)
            if turned:
                width, height = height, width
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


def _quarter_turned(image: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it a quarter (its displayed sides are swapped)."""
    return image.getexif().get(_EXIF_ORIENTATION) in _QUARTER_TURNS


def _open(image: Any, image_dir: str | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(resolve_path(image, image_dir))


def to_rgb(image: Image.Image, size: tuple[int, int] | None = None) -> Image.Image:
    """The image as the model should see it, in RGB, resized to `size` (upright width, height) when given.

    The EXIF orientation is applied (a phone photo stored sideways is turned upright, as viewers and the
    `datasets` library show it); transparent pixels are laid on white, since a plain RGB conversion would
    show what is under them, black in most diagrams drawn on a transparent background; 16- and 32-bit
    grey levels are scaled to 8 bits rather than clipped at 255, floating-point ones in 0..1 to 0..255.
    An image with transparency is resized before it is laid on white (Pillow resizes RGBA premultiplied, so
    the result is the same to rounding): at full size the white layer and the composite took three more
    copies of a large image.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        grey = image if image.mode in ("I", "F") else image.convert("I")
        # 16-bit data is 0..65535 whatever the mode says; 8-bit data stored in a wider mode stays as it is.
        if image.mode.startswith("I;16"):
            top = 65535
        else:
            brightest = grey.getextrema()[1]
            if image.mode == "F" and brightest <= 1.0:
                top = 1.0  # floating-point pixels in 0..1, the usual convention (they came out black)
            else:
                top = 255 if brightest <= 255 else max(65535, brightest)
        scale = 255 / top
        image = grey.point(lambda v: v * scale).convert("L")  # then resized with every other mode, below
    if image.mode in ("P", "L", "RGB") and "transparency" in image.info:  # a palette entry or a colour key (tRNS)
        image = image.convert("RGBA")
    if image.mode == "La":  # premultiplied alpha, which PIL converts to RGBA only through LA
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        if size is not None and size != rgba.size:
            rgba = rgba.resize(size, Image.Resampling.BICUBIC)
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    rgb = image.convert("RGB")
    return rgb if size is None or size == rgb.size else rgb.resize(size, Image.Resampling.BICUBIC)


def load_image(
    image: Any, image_dir: str | None, *, min_pixels: int | None = None, max_pixels: int | None = None
) -> Image.Image:
    """Decode an image, make it upright RGB (`to_rgb`) and resize it with `fit_size`.

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
        width, height = opened.size
        if _quarter_turned(opened):
            width, height = height, width
        # (to_rgb forces the full decode; the file handle is released below)
        return to_rgb(opened, fit_size(width, height, min_pixels, max_pixels))
    finally:
        if opened is not image:
            opened.close()
