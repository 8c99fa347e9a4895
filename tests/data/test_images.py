"""Image sizing rule and the cheap load-time probe."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pebr.data.images import fit_size, load_image, probe_image
from pebr.data.records import BadRecord


@pytest.mark.parametrize(
    "size, min_pixels, max_pixels, expected",
    [
        # No bounds: each side rounded to the nearest multiple of 28 (100/28 = 3.57 -> 4, 60/28 = 2.14 -> 2).
        ((100, 60), None, None, (112, 56)),
        # Tiny images grow to one 28x28 cell.
        ((10, 5), None, None, (28, 28)),
        # Over max: scale = sqrt(6000/3136) = 1.3832; 100/1.3832/28 = 2.58 -> 2, 60/1.3832/28 = 1.55 -> 1.
        ((100, 60), None, 3136, (56, 28)),
        # Under min: scale = sqrt(12544/6000) = 1.4459; 144.6/28 = 5.16 -> 6, 86.8/28 = 3.10 -> 4.
        ((100, 60), 12544, None, (168, 112)),
        # Inside the bounds: only the rounding.
        ((224, 224), 3136, 50176, (224, 224)),
        # The paper's stage bound (802816 = 896^2): scale = 1440/896 = 1.6071;
        # 1920/1.6071 = 1194.7 -> 42*28 = 1176, 1080/1.6071 = 672 -> 24*28 = 672.
        ((1920, 1080), 576, 802816, (1176, 672)),
        # Up to a fixed resolution (min = max = 200704): scale = sqrt(200704/7500) = 5.1730; 517.3/28 = 18.5 -> 19,
        # 388.0/28 = 13.9 -> 14; 532x392 = 208544 is over max, so the longer side gives way: 504x392 = 197568.
        ((100, 75), 200704, 200704, (504, 392)),
        # No multiple of 28 meets both: 336x336 = 112896, 308x336 = 103488 both over 100352; max_pixels wins.
        ((300, 299), 100000, 100352, (308, 308)),
    ],
)
def test_fit_size_by_hand(size, min_pixels, max_pixels, expected):
    assert fit_size(*size, min_pixels, max_pixels) == expected


def test_fit_size_properties():
    for width, height in [(1, 1), (27, 900), (3000, 29), (640, 480), (333, 777)]:
        w, h = fit_size(width, height, 3136, 50176)
        assert w % 28 == 0 and h % 28 == 0 and w >= 28 and h >= 28
        assert w * h <= 50176
    with pytest.raises(ValueError, match="positive"):
        fit_size(0, 10)
    with pytest.raises(ValueError, match="must not exceed"):
        fit_size(10, 10, 100, 50)


def png_bytes(size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "blue").save(buffer, format="PNG")
    return buffer.getvalue()


def test_probe_and_load_every_image_form(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    pil = Image.new("L", (40, 30))
    for image, image_dir in [
        ("a.png", str(tmp_path)),
        (str(tmp_path / "a.png"), "/elsewhere"),  # absolute paths ignore image_dir
        (png_bytes(), None),
        (pil, None),
    ]:
        assert probe_image(image, image_dir, "record 0") == (40, 30)
        loaded = load_image(image, image_dir, min_pixels=3136, max_pixels=50176)
        # 40x30 rounds to 28x28 (784 px), below min 3136: scale = sqrt(3136/1200) = 1.6166;
        # 40*1.6166 = 64.7 -> ceil(2.31)*28 = 84, 30*1.6166 = 48.5 -> ceil(1.73)*28 = 56.
        assert loaded.mode == "RGB" and loaded.size == (84, 56)
    assert pil.mode == "L"  # the caller's image is not changed


def test_probe_reports_missing_empty_corrupt_truncated(tmp_path):
    with pytest.raises(BadRecord, match=r"record 3 qid='x': image file '.*gone\.png' does not exist") as info:
        probe_image("gone.png", str(tmp_path), "record 3 qid='x'")
    assert info.value.reason == "image_missing"

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadRecord, match=r"empty\.png' is empty \(0 bytes\)") as info:
        probe_image("empty.png", str(tmp_path), "record 0")
    assert info.value.reason == "image_unreadable"

    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(BadRecord, match=r"junk\.png' cannot be read") as info:
        probe_image("junk.png", str(tmp_path), "record 0")
    assert info.value.reason == "image_unreadable"

    data = png_bytes((64, 64))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    with pytest.raises(BadRecord, match=r"cut\.png' cannot be read"):
        probe_image("cut.png", str(tmp_path), "record 0")

    with pytest.raises(BadRecord, match=r"<5 bytes>"):
        probe_image(b"\x00\x01\x02\x03\x04", None, "record 0")


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: enough for PIL to read the size, without the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [11000, 30000])  # 121 M pixels (over our limit), 900 M (a PIL "bomb")
def test_enormous_image_is_refused_at_load_time(tmp_path, side):
    import warnings

    from pebr.data.images import probe_image
    from pebr.data.records import BadRecord

    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(side, side))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadRecord, match="too large|pixels, more than") as err:
            probe_image(str(path), None, "record 7")
    assert err.value.reason == "image_too_large" and "record 7" in str(err.value)


def test_thin_images_stay_within_max_pixels():
    # The short side cannot go under 28 px, so the long side alone gives way (it once came out 3444x28).
    assert fit_size(6000, 25, 3136, 50176) == (1792, 28) and 1792 * 28 <= 50176
    assert fit_size(25, 6000, 3136, 50176) == (28, 1792)


def test_transparent_pixels_are_laid_on_white(tmp_path):
    drawing = Image.new("RGBA", (56, 56), (0, 0, 0, 0))  # a black square on a transparent background
    drawing.paste((0, 0, 0, 255), (10, 10, 30, 30))
    drawing.save(tmp_path / "rgba.png")
    rgb = load_image(str(tmp_path / "rgba.png"), None)
    assert rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((20, 20)) == (0, 0, 0)
    palette = Image.new("P", (28, 28), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    assert load_image(str(tmp_path / "palette.png"), None).getpixel((0, 0)) == (255, 255, 255)
    # A colour key (tRNS) in a grey or an RGB PNG: its transparent pixels came out black.
    Image.new("L", (28, 28), 0).save(tmp_path / "grey_key.png", transparency=0)
    Image.new("RGB", (28, 28), (0, 0, 0)).save(tmp_path / "rgb_key.png", transparency=(0, 0, 0))
    for name in ("grey_key.png", "rgb_key.png"):
        assert load_image(str(tmp_path / name), None).getpixel((0, 0)) == (255, 255, 255), name
    # Premultiplied grey with alpha, which PIL cannot turn into RGBA directly: it raised.
    from pebr.data.images import to_rgb

    half = Image.new("LA", (28, 28), (0, 128))  # black at half opacity
    assert to_rgb(half.convert("La")).getpixel((0, 0)) == to_rgb(half).getpixel((0, 0)) == (127, 127, 127)


def test_a_transparent_image_is_shrunk_before_it_is_laid_on_white(tmp_path):
    """(Laid on white at full size first, a large RGBA image took three more full-size copies.) The order does
    not change the pixels beyond rounding: Pillow resizes RGBA premultiplied. A sideways EXIF orientation still
    gives the upright size."""
    import numpy as np

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 420, 4), dtype=np.uint8)
    pixels[:150, :, 3] = 0  # the top half fully transparent, the rest of varied opacity
    drawing = Image.fromarray(pixels, "RGBA")
    drawing.save(tmp_path / "rgba.png")
    small = load_image(str(tmp_path / "rgba.png"), None, max_pixels=28 * 28 * 20)
    assert small.size == fit_size(420, 300, None, 28 * 28 * 20) and small.mode == "RGB"
    background = Image.new("RGBA", drawing.size, (255, 255, 255, 255))
    first_laid = Image.alpha_composite(background, drawing).convert("RGB").resize(small.size, Image.Resampling.BICUBIC)
    difference = np.abs(np.asarray(small, dtype=int) - np.asarray(first_laid, dtype=int))
    assert difference.max() <= 2 and np.asarray(small)[:small.height // 3].min() == 255  # the transparent part white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways
    drawing.save(tmp_path / "turned.png", exif=exif.tobytes())
    assert load_image(str(tmp_path / "turned.png"), None, max_pixels=28 * 28 * 20).size == fit_size(
        300, 420, None, 28 * 28 * 20)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    import numpy as np

    levels = np.linspace(0, 65535, 56 * 56).reshape(56, 56).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "grey16.png")
    grey = np.asarray(load_image(str(tmp_path / "grey16.png"), None))[..., 0]
    assert grey.min() == 0 and grey.max() == 255
    assert (grey == 255).mean() < 0.01  # clipping at 255 made almost every pixel white
    assert abs(int(grey[28, 28]) - 128) <= 2


@pytest.mark.parametrize("mode, dtype, ext", [("I;16", "uint16", "png"), ("I", "int32", "tif"), ("F", "float32", "tif")])
def test_wide_grey_levels_are_resized_like_any_image(tmp_path, mode, dtype, ext):
    """16-bit, 32-bit and float images kept their stored size: the prompt's length was counted at the fitted size
    while the model got the full one (a 2000 x 1500 16-bit PNG: 1001 tokens counted, 3863 given)."""
    import numpy as np

    Image.fromarray(np.full((150, 200), 100, dtype=dtype)).save(tmp_path / f"wide.{ext}")
    assert Image.open(tmp_path / f"wide.{ext}").mode == mode
    loaded = load_image(str(tmp_path / f"wide.{ext}"), None, max_pixels=28 * 28 * 12)
    assert loaded.size == fit_size(200, 150, None, 28 * 28 * 12) == (112, 84) and loaded.mode == "RGB"


@pytest.mark.parametrize("value, grey", [(0.5, 128), (128.0, 128), (500.0, 2)])
def test_floating_point_grey_is_scaled_by_its_range(tmp_path, value, grey):
    """Floats up to 1 are 0..1 levels (they came out black), up to 255 8-bit levels, above it 16-bit ones."""
    import numpy as np

    Image.fromarray(np.full((56, 56), value, dtype=np.float32)).save(tmp_path / "float.tif")
    assert abs(int(np.asarray(load_image(str(tmp_path / "float.tif"), None))[28, 28, 0]) - grey) <= 1


# Orientation: displayed size, where the stored left (blue) half shows, where the right (red) one does. 3 turns the
# image half round, 6 a quarter clockwise (left half on top), 8 a quarter anticlockwise (left half at the bottom).
@pytest.mark.parametrize("orientation, displayed, blue_at, red_at", [
    (1, (112, 56), (28, 28), (84, 28)), (3, (112, 56), (84, 28), (28, 28)),
    (6, (56, 112), (28, 28), (28, 84)), (8, (56, 112), (28, 84), (28, 28))])
def test_exif_orientation_is_applied_in_probe_and_load(tmp_path, orientation, displayed, blue_at, red_at):
    photo = Image.new("RGB", (112, 56), (255, 0, 0))
    photo.paste((0, 0, 255), (0, 0, 56, 56))  # blue on the stored image's left half
    exif = photo.getexif()
    exif[0x0112] = orientation
    photo.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    photo.save(tmp_path / "photo.png", exif=exif.tobytes())
    for name in ("photo.jpg", "photo.png"):
        path = str(tmp_path / name)
        assert probe_image(path, None, "r") == displayed
        upright = load_image(path, None)
        assert upright.size == displayed
        red, _, blue = upright.getpixel(blue_at)
        assert blue > 200 and red < 60, (name, upright.getpixel(blue_at))
        red, _, blue = upright.getpixel(red_at)
        assert red > 200 and blue < 60, (name, upright.getpixel(red_at))


def test_truncated_jpeg_fails_the_probe(tmp_path):
    import random

    rng = random.Random(0)
    Image.frombytes("RGB", (128, 128), bytes(rng.randrange(256) for _ in range(128 * 128 * 3))).save(
        tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert probe_image(str(tmp_path / "whole.jpg"), None, "r") == (128, 128)
    with pytest.raises(BadRecord, match=r"rec 4: image .*cut\.jpg' cannot be read: image file is truncated") as err:
        probe_image(str(tmp_path / "cut.jpg"), None, "rec 4")
    assert err.value.reason == "image_unreadable"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_a_cut_file_fails_the_probe_in_every_format(tmp_path, fmt):
    """PIL's verify() checks nothing of BMP, GIF or TIFF pixels: those cut files passed the probe and failed at
    the step that drew them."""
    import random

    rng = random.Random(0)
    image = Image.frombytes("RGB", (120, 80), bytes(rng.randrange(256) for _ in range(120 * 80 * 3)))
    image.save(tmp_path / f"whole.{fmt.lower()}", fmt)
    data = (tmp_path / f"whole.{fmt.lower()}").read_bytes()
    (tmp_path / f"cut.{fmt.lower()}").write_bytes(data[: len(data) // 2])
    assert probe_image(str(tmp_path / f"whole.{fmt.lower()}"), None, "r") == (120, 80)
    with pytest.raises(BadRecord, match=rf"rec 2: image .*cut\.{fmt.lower()}' cannot be read") as err:
        probe_image(str(tmp_path / f"cut.{fmt.lower()}"), None, "rec 2")
    assert err.value.reason == "image_unreadable"
