"""The one image preprocessing used everywhere: training, export checks and the runtime.

    load_image(source) -> uint8 (S, S, 3) RGB      decode, EXIF-transpose, RGB, Pillow bilinear resize
    normalize(images)  -> float32 (N, 3, S, S)     ImageNet mean/std, channels first

Torch-free on purpose: services embed captrt.runtime with numpy, onnxruntime and pillow only.

Choices (all deliberate, all tested):
- Resize: Pillow ``resize((S, S), BILINEAR)`` on the RGB image, aspect ratio not kept (like the seed,
  which used cv2 bilinear; Pillow's filter widens its support when shrinking, so it also anti-aliases).
- Alpha is dropped, not composited: RGBA/LA/PA -> RGB keeps the colour stored under transparent pixels.
  That is what the seed's ``Image.open(p).convert('RGB')`` did for the training images.
- 16-bit samples (modes I;16*, I) are mapped 0..65535 -> 0..255 (round(v / 257)); Pillow's own
  conversion clips them, turning most 16-bit PNGs white. Mode F follows Pillow's convention for
  floats (0..255, clipped), so ``img.convert('F')`` of an 8-bit image gives the same result.
- Only frame 0 of animations (GIF, APNG, WebP, MPO) is read when decoding bytes, paths and files.
- The result is the same uint8 array whatever the source type: path, bytes, file object, or a PIL
  image freshly opened from that file (PIL images go through the same steps, minus the format check;
  they are used at their current frame).
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from collections.abc import Iterable
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

from captrt.checks import check_int
from captrt.files import NotRegularFileError, open_regular

IMAGE_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_FILTER = "bilinear"  # Pillow Image.Resampling.BILINEAR
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
# 64 Mi pixels: an 8192x8192 photo still fits; below Pillow's own bomb limit (~89.5 Mpx), so our
# check is the one that fires by default, before any pixel memory is allocated.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image, np.ndarray]

_RESAMPLE = Image.Resampling.BILINEAR
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)

# Everything a Pillow decoder is known to raise on hostile or broken input (its fuzzers find all of
# these). Only caught around Pillow calls; explicit rather than Exception so e.g. MemoryError and
# KeyboardInterrupt still propagate as themselves.
_DECODE_ERRORS = (
    OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError,
    ArithmeticError, Image.DecompressionBombError, Image.DecompressionBombWarning,
)
# Pillow formats that are flavours of an allowed one: MPO is a multi-picture JPEG (many phone
# cameras write it) and is returned by the JPEG plugin itself.
_FORMAT_ALIASES = {"MPO": "JPEG"}
# Magic numbers, only to name a refused format in the error message (never to decode).
_MAGIC = (
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"8BPS", "PSD"), (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"), (b"\xff\x4f\xff\x51", "JPEG2000"), (b"qoif", "QOI"),
)


class InvalidImageError(ValueError):
    """An input that is not a decodable image; message names the source (path or '<bytes>' etc.)."""


class UnsupportedImageFormatError(InvalidImageError):
    """A recognised image format that is not on the allow-list (e.g. TIFF when only JPEG/PNG/WEBP are accepted)."""


class ImageTooLargeError(InvalidImageError):
    """An image above the encoded-byte cap or the pixel cap (decompression bombs included)."""


def describe_source(source: object) -> str:
    """A short name of ``source`` for error messages: the path, '<bytes 1234>', '<PIL image>', ..."""
    if isinstance(source, str):
        return source
    if isinstance(source, os.PathLike):
        return os.fsdecode(os.fspath(source))
    if isinstance(source, (bytes, bytearray)):
        return f"<bytes {len(source)}>"
    if isinstance(source, memoryview):
        return f"<bytes {source.nbytes}>"
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", "")
        return f"<PIL image from {filename}>" if isinstance(filename, str) and filename else "<PIL image>"
    if isinstance(source, np.ndarray):
        return f"<ndarray {source.shape} {source.dtype}>"
    if hasattr(source, "read"):
        name = getattr(source, "name", None)
        return name if isinstance(name, str) else "<file object>"
    return f"<{type(source).__name__}>"


def load_image(source: ImageSource, size: int = IMAGE_SIZE, *, formats: Iterable[str] = DEFAULT_FORMATS,
               max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """-> uint8 (size, size, 3) RGB: decode, EXIF-transpose, RGB, resize with Pillow bilinear.

    source: a path, encoded bytes (bytes/bytearray/memoryview), a binary file object (read from its
    current position), a PIL image, or a uint8 array (H, W, 3) RGB, (H, W) gray or (H, W, 4) RGBA.
    formats: Pillow format names accepted when decoding bytes/paths/files (MPO counts as JPEG).
    max_bytes: encoded size cap, checked before decoding. max_pixels: width*height cap, checked
    before pixel data is decoded (for every source type).
    name: how error messages name the source (default: describe_source, e.g. the path or '<bytes N>');
    a service passes e.g. the upload's part name.
    Raises InvalidImageError (a ValueError naming the source) for anything that is not a usable
    image: UnsupportedImageFormatError for a recognised format off the allow-list,
    ImageTooLargeError above a cap. TypeError for an unsupported source type.
    """
    check_int("size", size)
    name = describe_source(source) if name is None else name
    if isinstance(source, np.ndarray):
        return _finish(_image_from_array(source, name), name, size, max_pixels)
    if isinstance(source, Image.Image):
        return _finish(source, name, size, max_pixels)
    data = _read_bytes(source, name, max_bytes)
    return _decode(data, name, size, _normalize_formats(formats), max_pixels)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) RGB -> float32 (N, 3, S, S) with ImageNet mean/std (same math as the exported graph).

    Exactly ``((x.astype(float32) / 255) - mean) / std`` in float32, then NHWC -> NCHW; the exported
    graph does Cast, Div 255, Sub mean, Div std in that order, so both agree to the last bit or two.
    """
    if not isinstance(images, np.ndarray):
        raise ValueError(f"normalize expects a uint8 (N, H, W, 3) RGB array, got {type(images).__name__}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"normalize expects a uint8 (N, H, W, 3) RGB array (use images[None] for one image), "
                         f"got {images.dtype} of shape {images.shape}")
    x = images.astype(np.float32) / np.float32(255.0)
    x = (x - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------- input


def _normalize_formats(formats: Iterable[str]) -> tuple[str, ...]:
    """Upper-cased tuple of format names (a lone string is one format, not its characters)."""
    if isinstance(formats, str):
        formats = (formats,)
    result = tuple(str(f).upper() for f in formats)
    if not result:
        raise ValueError("formats must name at least one image format")
    return result


def _read_bytes(source: object, name: str, max_bytes: int) -> bytes:
    """The encoded image of a path, bytes-like or binary file object, at most ``max_bytes`` long."""
    too_big = f"{name}: larger than the {max_bytes}-byte limit"
    if isinstance(source, (bytes, bytearray, memoryview)):
        length = source.nbytes if isinstance(source, memoryview) else len(source)
        if length > max_bytes:
            raise ImageTooLargeError(f"{too_big} ({length} bytes)")
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        try:
            with open_regular(source) as f:  # a FIFO or a device is refused before it is read
                length = os.fstat(f.fileno()).st_size
                if length > max_bytes:  # refuse from the size alone, before reading anything
                    raise ImageTooLargeError(f"{too_big} ({length} bytes)")
                data = f.read(max_bytes + 1)  # bounded: the file may have grown since
        except FileNotFoundError:
            raise InvalidImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise InvalidImageError(f"{name}: is a directory, not an image file") from None
        except NotRegularFileError as exc:
            raise InvalidImageError(f"{name}: {exc.strerror}, refused unread") from None
        except PermissionError:
            raise InvalidImageError(f"{name}: permission denied") from None
        except OSError as exc:
            raise InvalidImageError(f"{name}: cannot read file ({exc.strerror or exc})") from exc
    elif hasattr(source, "read"):
        if isinstance(source, io.TextIOBase):
            raise InvalidImageError(f"{name}: file object is in text mode; open it with 'rb'")
        try:
            data = source.read(max_bytes + 1)  # never more than the cap + 1, whatever the stream
        except (OSError, ValueError) as exc:  # ValueError: closed file, or a decoding text stream
            raise InvalidImageError(f"{name}: cannot read file object ({exc})") from exc
        if isinstance(data, str):
            raise InvalidImageError(f"{name}: file object is in text mode; open it with 'rb'")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidImageError(f"{name}: read() returned {type(data).__name__}, not bytes")
        data = bytes(data)
    else:
        raise TypeError(f"load_image: unsupported source type {type(source).__name__} (expected a path, "
                        "bytes, a binary file object, a PIL image or a uint8 ndarray)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{too_big} (read more than {max_bytes} bytes)")
    return data


def _image_from_array(array: np.ndarray, name: str) -> Image.Image:
    """A PIL image of a uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA array (alpha dropped)."""
    if array.dtype != np.uint8:
        raise InvalidImageError(f"{name}: arrays must be uint8 (0..255); convert e.g. with "
                                "np.clip(a * 255, 0, 255).astype(np.uint8) for floats in 0..1")
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]  # drop alpha, as for RGBA images
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise InvalidImageError(f"{name}: arrays must be (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidImageError(f"{name}: empty image ({array.shape[1]}x{array.shape[0]})")
    # fromarray wants contiguous memory; a view (e.g. alpha dropped or a crop) is copied here.
    return Image.fromarray(np.ascontiguousarray(array))


# --------------------------------------------------------------------------------------------- decode


def _check_dimensions(dims: tuple[int, int], name: str, max_pixels: int) -> None:
    """Refuse empty images and images above the pixel cap (from the header, before decoding)."""
    width, height = dims
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{name}: empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} is {width * height} pixels, above the "
                                f"{max_pixels}-pixel limit (possible decompression bomb)")


def _sniff(data: bytes) -> str | None:
    """The format named by ``data``'s magic number, if it is one we know (for messages only)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _MAGIC if data.startswith(magic)), None)


def _decode(data: bytes, name: str, size: int, formats: tuple[str, ...], max_pixels: int) -> np.ndarray:
    """Encoded bytes -> uint8 (size, size, 3), only trying the plugins of ``formats``."""
    if not data:
        raise InvalidImageError(f"{name}: empty input (0 bytes)")
    # Turn Pillow's bomb warning into an error for this call only; Image.MAX_IMAGE_PIXELS is left
    # alone. (catch_warnings swaps the process-wide filter list, so with threads a concurrent call
    # could at worst leave this one 'error' filter installed: bomb warnings elsewhere then raise.)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            # Only the allowed plugins parse the header: less parser surface for hostile input.
            img = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError:
            sniffed = _sniff(data)
            allowed = ", ".join(formats)
            if sniffed and sniffed not in formats:
                raise UnsupportedImageFormatError(f"{name}: {sniffed} images are not accepted (allowed: {allowed})") from None
            raise InvalidImageError(f"{name}: not a recognized image (allowed formats: {allowed})") from None
        except _DECODE_ERRORS as exc:
            raise _decode_error(name, exc) from exc
        with img:
            fmt = _FORMAT_ALIASES.get(img.format or "", img.format)
            if fmt not in formats:
                raise UnsupportedImageFormatError(f"{name}: {img.format} images are not accepted (allowed: {', '.join(formats)})")
            _check_dimensions(img.size, name, max_pixels)
            try:
                img.seek(0)  # frame 0 of animations (a no-op for still images)
            except _DECODE_ERRORS as exc:
                raise _decode_error(name, exc) from exc
            return _finish(img, name, size, max_pixels)


def _decode_error(name: str, exc: BaseException) -> InvalidImageError:
    """A clear InvalidImageError for a Pillow failure (the original stays chained as __cause__)."""
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageTooLargeError(f"{name}: too many pixels (possible decompression bomb): {exc}")
    detail = str(exc) or type(exc).__name__
    return InvalidImageError(f"{name}: cannot decode image ({type(exc).__name__}: {detail})")


def _finish(img: Image.Image, name: str, size: int, max_pixels: int) -> np.ndarray:
    """Load pixels, EXIF-transpose, convert to RGB, resize: the steps shared by every source type."""
    _check_dimensions(img.size, name, max_pixels)
    try:
        img.load()  # truncated or corrupt data fails here (LOAD_TRUNCATED_IMAGES is left False)
        _check_dimensions(img.size, name, max_pixels)  # some plugins only know the final size now
        # exif_transpose drops the orientation tag from its result, so an already transposed image
        # is not rotated twice.
        img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img, name)
        out = rgb.resize((size, size), _RESAMPLE)
        array = np.array(out, dtype=np.uint8)
    except InvalidImageError:
        raise
    except _DECODE_ERRORS as exc:
        raise _decode_error(name, exc) from exc
    if array.shape != (size, size, 3):  # cannot happen for RGB; guards the contract
        raise InvalidImageError(f"{name}: preprocessing produced shape {array.shape}")
    return array


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    """An RGB version of a loaded image (see the module docstring for alpha and 16-bit choices)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (I;16 from 16-bit PNGs; I from some decoders): 0..65535 -> 0..255, rounded.
        samples = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return Image.fromarray(((samples + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "F":
        samples = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.rint(np.clip(samples, 0, 255)).astype(np.uint8)).convert("RGB")
    if (mode == "P" and "transparency" in img.info) or mode in ("PA", "RGBa", "La"):
        # Palette transparency (and premultiplied alpha) must go through RGBA; the alpha is then dropped.
        return img.convert("RGBA").convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, P, RGBA, LA, CMYK, YCbCr, LAB, HSV, ...
    except ValueError as exc:
        raise InvalidImageError(f"{name}: unsupported image mode {mode!r} ({exc})") from exc
