"""Tests of captrt.runtime.preprocess: every image is generated here, in tmp_path or in memory."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from captrt.runtime.preprocess import (
    DEFAULT_FORMATS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTooLargeError,
    InvalidImageError,
    UnsupportedImageFormatError,
    describe_source,
    load_image,
    normalize,
)

S = 32  # small output size keeps the tests fast
BILINEAR = Image.Resampling.BILINEAR
REPO = Path(__file__).resolve().parents[2]


def smooth(h: int = 24, w: int = 40, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 of 8x8 flat blocks: few colours (exact in GIF), JPEG-friendly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


def noise(h: int = 64, w: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def expected_resize(rgb: np.ndarray, size: int = S) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), BILINEAR))


def png_header(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: a bomb that is small on disk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 4096))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt, kwargs, exact", [
    ("PNG", {}, True), ("BMP", {}, True), ("GIF", {}, True), ("WEBP", {"lossless": True}, True),
    ("JPEG", {"quality": 95}, False),
])
def test_common_formats_decode(tmp_path, fmt, kwargs, exact):
    rgb = smooth()
    path = write(tmp_path / f"img.{fmt.lower()}", encode(Image.fromarray(rgb), fmt, **kwargs))
    out = load_image(path, S)
    assert out.dtype == np.uint8 and out.shape == (S, S, 3)
    want = expected_resize(rgb)
    if exact:
        np.testing.assert_array_equal(out, want)
    else:
        assert np.abs(out.astype(int) - want).mean() < 6


def test_default_size_and_constants():
    assert IMAGE_SIZE == 256 and DEFAULT_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "GIF")
    assert DEFAULT_MAX_BYTES == 50 * 1024 * 1024 and DEFAULT_MAX_PIXELS < Image.MAX_IMAGE_PIXELS
    out = load_image(encode(Image.new("RGB", (1, 1), (7, 8, 9)), "PNG"))  # 1x1 is resized up
    assert out.shape == (256, 256, 3) and (out == (7, 8, 9)).all()


def test_tiff_refused_by_default_but_allowed_on_request(tmp_path):
    rgb = smooth()
    path = write(tmp_path / "img.tif", encode(Image.fromarray(rgb), "TIFF"))
    with pytest.raises(InvalidImageError, match=r"img\.tif: TIFF images are not accepted"):
        load_image(path, S)
    np.testing.assert_array_equal(load_image(path, S, formats=("tiff",)), expected_resize(rgb))


def test_error_kinds_and_the_name_override():
    """Services map these to HTTP statuses: a refused format, a cap, anything else unreadable."""
    png = encode(Image.fromarray(smooth()), "PNG")
    tiff = encode(Image.fromarray(smooth()), "TIFF")
    with pytest.raises(UnsupportedImageFormatError, match=r"^upload\.tif: TIFF images are not accepted"):
        load_image(tiff, S, name="upload.tif")
    with pytest.raises(UnsupportedImageFormatError, match="PNG images are not accepted"):
        load_image(png, S, formats=("JPEG",))
    with pytest.raises(ImageTooLargeError, match="byte limit"):
        load_image(png, S, max_bytes=len(png) - 1)
    with pytest.raises(ImageTooLargeError, match="pixel limit|pixels, above"):
        load_image(png, S, max_pixels=10)
    with pytest.raises(InvalidImageError) as info:
        load_image(png[:40], S, name="part 3")
    assert not isinstance(info.value, (UnsupportedImageFormatError, ImageTooLargeError))
    assert str(info.value).startswith("part 3:")


def test_format_restriction_is_applied(tmp_path):
    data = encode(Image.fromarray(smooth()), "PNG")
    with pytest.raises(InvalidImageError, match="PNG images are not accepted"):
        load_image(data, S, formats=("JPEG",))
    assert load_image(data, S, formats="PNG").shape == (S, S, 3)  # a lone string is one format


# ------------------------------------------------------------------------------- same for any source


def test_every_source_type_gives_the_same_array(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate, so every route must apply the EXIF step
    path = write(tmp_path / "photo.jpg", encode(Image.fromarray(smooth()), "JPEG", exif=exif))
    data = path.read_bytes()
    reference = load_image(str(path), S)
    with open(path, "rb") as f:
        from_file = load_image(f, S)
    with Image.open(path) as pil:
        from_pil = load_image(pil, S)
    for out in (load_image(path, S), load_image(data, S), load_image(bytearray(data), S),
                load_image(memoryview(data), S), load_image(io.BytesIO(data), S), from_file, from_pil):
        np.testing.assert_array_equal(out, reference)


def test_ndarray_sources_match_the_decoded_image(tmp_path):
    rgba = np.dstack([smooth(), np.full((24, 40), 77, np.uint8)])
    path = write(tmp_path / "img.png", encode(Image.fromarray(rgba), "PNG"))
    from_path = load_image(path, S)
    np.testing.assert_array_equal(load_image(rgba, S), from_path)  # HxWx4: alpha dropped
    np.testing.assert_array_equal(load_image(rgba[:, :, :3], S), from_path)  # non-contiguous view
    gray = smooth()[:, :, 0]
    np.testing.assert_array_equal(load_image(gray, S), load_image(encode(Image.fromarray(gray), "PNG"), S))


@pytest.mark.parametrize("array, match", [
    (np.zeros((8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 2), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((1, 8, 8, 3), np.uint8), r"\(H, W, 3\)"),
    (np.zeros((0, 5, 3), np.uint8), "empty image"),
])
def test_bad_arrays_are_refused(array, match):
    with pytest.raises(InvalidImageError, match=match):
        load_image(array, S)


# ------------------------------------------------------------------------------ orientation, frames


def test_exif_orientation_6_is_applied(tmp_path):
    img = np.full((32, 64, 3), 255, np.uint8)  # 64 wide, 32 high, red block at the top left
    img[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_image(write(tmp_path / "o6.jpg", encode(Image.fromarray(img), "JPEG", exif=exif)), 64)
    plain = load_image(write(tmp_path / "o1.jpg", encode(Image.fromarray(img), "JPEG")), 64)
    red = lambda px: px[0] > 200 and px[1] < 60 and px[2] < 60  # noqa: E731
    # Orientation 6 = rotate 90 degrees clockwise to display: the top-left block goes top-right.
    assert red(rotated[4, 56]) and not red(rotated[4, 8])
    assert red(plain[4, 8]) and not red(plain[4, 56])


def _frames(mode: str = "RGB") -> list[Image.Image]:
    return [Image.new(mode, (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize("fmt, kwargs", [
    ("GIF", {"duration": 50, "loop": 0}), ("PNG", {"duration": 50}), ("WEBP", {"duration": 50, "lossless": True}),
])
def test_animations_give_the_first_frame(fmt, kwargs):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("no WebP support in this Pillow")
    first, *rest = _frames()
    data = encode(first, fmt, save_all=True, append_images=rest, **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    out = load_image(data, 16)
    assert (out == (255, 0, 0)).all()


def test_mpo_counts_as_jpeg_and_gives_the_first_picture():
    first, second, _ = _frames()
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = load_image(data, 16)
    assert out[..., 0].min() > 240 and out[..., 1].max() < 20


# ------------------------------------------------------------------------------------------- modes


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    assert (load_image(cmyk, 16) == (255, 0, 0)).all()
    out = load_image(encode(cmyk, "JPEG", quality=95), 16).astype(int)
    assert np.abs(out - (255, 0, 0)).max() < 12


@pytest.mark.parametrize("fmt, transparency", [("PNG", b"\x00\x80"), ("PNG", 0), ("GIF", 0)])
def test_palette_with_transparency_keeps_the_colour_under_it(fmt, transparency):
    img = Image.new("P", (16, 16), 0)
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.paste(1, (8, 0, 16, 16))
    data = encode(img, fmt, transparency=transparency)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == transparency
    with warnings.catch_warnings():
        # Pillow warns "Palette images with Transparency expressed in bytes should be converted to
        # RGBA images" when P goes straight to RGB: going through RGBA must avoid that.
        warnings.simplefilter("error")
        out = load_image(data, 16)
    assert (out[:, :8] == (255, 0, 0)).all() and (out[:, 8:] == (0, 255, 0)).all()


@pytest.mark.parametrize("mode, colour, want", [
    ("LA", (100, 50), (100, 100, 100)), ("RGBA", (10, 20, 30, 0), (10, 20, 30)), ("L", 90, (90, 90, 90)),
])
def test_alpha_is_dropped_and_gray_expanded(mode, colour, want):
    out = load_image(encode(Image.new(mode, (8, 8), colour), "PNG"), 8)
    assert (out == want).all()


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    flat = np.full((8, 8), 40000, np.uint16)
    path = write(tmp_path / "deep.png", encode(Image.fromarray(flat), "PNG"))
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a 16-bit image, not reduced on save
    out = load_image(path, 8)
    assert (out == 156).all()  # round(40000 / 257); naive convert('RGB') would give 255

    ramp = np.linspace(0, 65535, 64).astype(np.uint16).reshape(8, 8)
    out = load_image(encode(Image.fromarray(ramp), "PNG"), 8)[..., 0]
    assert out.min() == 0 and out.max() == 255 and (np.diff(out.ravel().astype(int)) >= 0).all()


def test_32_bit_int_and_float_modes():
    assert (load_image(Image.fromarray(np.full((8, 8), 40000, np.int32)), 8) == 156).all()  # mode I: 16-bit
    gray = Image.fromarray(smooth()[:, :, 1])
    np.testing.assert_array_equal(load_image(gray.convert("F"), S), load_image(gray, S))  # F: 0..255


def test_one_bit_images(tmp_path):
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 16, 8))
    for fmt in ("PNG", "BMP"):
        out = load_image(encode(img, fmt), 16)
        assert (out[:8] == 255).all() and (out[8:] == 0).all(), fmt


def test_empty_images_are_refused():
    with pytest.raises(InvalidImageError, match=r"<PIL image>: empty image \(0x0\)"):
        load_image(Image.new("RGB", (0, 0)), S)
    with pytest.raises(InvalidImageError, match=r"<bytes \d+>"):
        load_image(png_header(0, 0), S)


# ------------------------------------------------------------------------------------------- errors


def test_not_an_image():
    with pytest.raises(InvalidImageError, match=r"<bytes 27>: not a recognized image"):
        load_image(b"hello, this is not an image", S)
    with pytest.raises(InvalidImageError, match="empty input"):
        load_image(b"", S)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail(tmp_path, fmt):
    data = encode(Image.fromarray(noise()), fmt)
    path = write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.(jpeg|png): cannot decode image"):
        load_image(path, S)
    with pytest.raises(InvalidImageError, match=r"<bytes \d+>"):
        load_image(path.read_bytes(), S)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(InvalidImageError, match=r"nope\.jpg: no such file"):
        load_image(tmp_path / "nope.jpg", S)
    with pytest.raises(InvalidImageError, match="is a directory"):
        load_image(str(tmp_path), S)


def test_wrong_source_types(tmp_path):
    with pytest.raises(TypeError, match="unsupported source type int"):
        load_image(42, S)  # type: ignore[arg-type]
    path = write(tmp_path / "img.png", encode(Image.new("RGB", (4, 4)), "PNG"))
    with open(path, encoding="latin-1") as text, pytest.raises(InvalidImageError, match="text mode"):
        load_image(text, S)
    with pytest.raises(ValueError, match="size"):
        load_image(path, 0)


def test_byte_cap(tmp_path):
    data = encode(Image.fromarray(noise()), "PNG")
    path = write(tmp_path / "big.png", data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(InvalidImageError, match="byte limit"):
            load_image(source, S, max_bytes=len(data) - 1)
    assert load_image(path, S, max_bytes=len(data)).shape == (S, S, 3)
    sparse = tmp_path / "sparse.png"  # 64 MiB of nothing: refused from its size, before reading
    with open(sparse, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    # "(67108864 bytes)" comes from the file's size: the check happened before any read.
    with pytest.raises(InvalidImageError, match=r"sparse\.png: larger than the 52428800-byte limit \(67108864 bytes\)"):
        load_image(sparse, S)


@pytest.mark.parametrize("width, height, match", [
    (100_000, 100_000, "decompression bomb"),  # above 2x Pillow's limit: its DecompressionBombError
    (10_000, 10_000, "decompression bomb"),  # between 1x and 2x: Pillow's warning, turned into an error
    (9_000, 9_000, "above the 67108864-pixel limit"),  # below Pillow's limit: our own cap
])
def test_decompression_bombs_fail_before_decoding(tmp_path, width, height, match):
    path = write(tmp_path / "bomb.png", png_header(width, height))
    assert path.stat().st_size < 1000
    filters, limit = list(warnings.filters), Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidImageError, match=match):
            load_image(path, S)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters and Image.MAX_IMAGE_PIXELS == limit  # no global changes


def test_pixel_cap_applies_to_every_source():
    rgb = smooth()  # 24x40 = 960 pixels
    for source in (encode(Image.fromarray(rgb), "PNG"), Image.fromarray(rgb), rgb):
        with pytest.raises(InvalidImageError, match="above the 959-pixel limit"):
            load_image(source, S, max_pixels=959)
        assert load_image(source, S, max_pixels=960).shape == (S, S, 3)


def test_describe_source(tmp_path):
    assert describe_source(tmp_path / "a.jpg") == os.fspath(tmp_path / "a.jpg")
    assert describe_source(b"abc") == "<bytes 3>" and describe_source(memoryview(b"ab")) == "<bytes 2>"
    assert describe_source(Image.new("RGB", (1, 1))) == "<PIL image>"
    assert describe_source(io.BytesIO()) == "<file object>"
    assert "uint8" in describe_source(np.zeros((2, 2), np.uint8))


# --------------------------------------------------------------------------------------- normalize


def test_normalize_matches_a_hand_computation():
    images = np.zeros((2, 3, 4, 3), np.uint8)
    images[1, 2, 3] = (0, 128, 255)
    images[0, 0, 1] = (10, 20, 30)
    out = normalize(images)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3, 4) and out.flags.c_contiguous
    for n, y, x in ((1, 2, 3), (0, 0, 1), (0, 2, 2)):
        for c in range(3):
            want = (images[n, y, x, c] / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
            assert abs(float(out[n, c, y, x]) - want) < 1e-6
    assert abs(float(out[1, 2, 2, 3]) - (1.0 - 0.406) / 0.225) < 1e-6  # blue 255 -> ~2.64


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.uint8), np.zeros((1, 4, 4, 3), np.float32),
                                 np.zeros((1, 4, 4, 4), np.uint8)])
def test_normalize_refuses_other_layouts(bad):
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        normalize(bad)


# --------------------------------------------------------------------------------------- torch-free


def test_import_works_without_torch():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "sys.modules['torchvision'] = None\n"
        "import numpy as np\n"
        "import captrt.runtime.preprocess as p\n"
        "out = p.normalize(p.load_image(np.zeros((4, 4, 3), np.uint8), 8)[None])\n"
        "assert out.shape == (1, 3, 8, 8)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
