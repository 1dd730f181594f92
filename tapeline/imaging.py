"""Decoding and resizing one image with Pillow: what image folders, Parquet cells and `predict` share."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from tapeline.errors import ImageError

MAX_IMAGE_PIXELS = 4096 * 4096

# The one list of image formats tapeline reads: image folders take these extensions only; Parquet cells and
# `tapeline predict` (which also takes .npy arrays) are decoded by Pillow, which may open more. The docs (data.md,
# "Image formats") and the CLI help say the same.
IMAGE_FORMATS = "PNG, JPEG, BMP or GIF"


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_MODES = ("I", "F")
COLOUR_MODES = ("RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBa")


def _pillow_pixels(img: Any, where: str) -> np.ndarray:
    """A decoded Pillow image as uint8 [H, W] (grey) or [H, W, 3] (colour), for training data and `predict`.

    16-bit images are scaled from 0..65535 (not clipped: a clipped scan turns white), 32-bit integer and
    float images from their own min..max; palette, alpha, CMYK and other colour modes become RGB (alpha
    dropped), 1-bit becomes grey. Anything else is refused by name."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        return np.round(np.asarray(img, dtype=np.float64) / 257.0).astype(np.uint8)
    if mode in WIDE_MODES:
        values = np.asarray(img, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageError(f"{where}: {mode} image holds non-finite values")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
        return np.round(scaled).astype(np.uint8)
    if mode in ("L", "RGB"):  # from the raw bytes: NumPy's array interface to Pillow costs half as much again
        return np.frombuffer(img.tobytes(), np.uint8).reshape(img.height, img.width, *((3,) if mode == "RGB" else ()))
    if mode in ("1", "LA", "La"):
        return np.asarray(img.convert("L"), dtype=np.uint8)
    if mode in COLOUR_MODES:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    raise ImageError(f"{where}: Pillow image mode {mode!r} is not supported; convert it to 8-bit grey or RGB")


def open_image(data: bytes | Path, where: str, formats: tuple[str, ...] | None = None) -> np.ndarray:
    """PNG/JPEG/… bytes or file as uint8 [H, W] or [H, W, 3], refusing oversize images and decompression
    bombs by name before any pixel is decoded, and (with `formats`) content of any other format than those."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes | bytearray) else data) as img:
            if formats is not None and img.format not in formats:
                suffix = Path(where).suffix
                raise ImageError(f"the extension {suffix} says {formats[0]} but the content is {img.format}")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{where} is {img.width}x{img.height} pixels, larger than tapeline accepts "
                                 f"({MAX_IMAGE_PIXELS} pixels)")
            return _pillow_pixels(img, where)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where} is a decompression bomb ({exc}); refused") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{where} is not an image tapeline can read ({IMAGE_FORMATS}): {exc}") from exc
INTERPOLATIONS = ("bilinear", "nearest", "area", "bicubic")


# ---------------------------------------------------------------- decoding

def _resample_filter(interpolation: str) -> Any:
    """Pillow's resampling filter for `data.interpolation` (area is Pillow's box filter)."""
    from PIL import Image

    return {"bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST,
            "area": Image.Resampling.BOX, "bicubic": Image.Resampling.BICUBIC}[interpolation]


def crop_box(width: int, height: int, target: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred box of the target's aspect ratio (H, W) inside a width x height image."""
    target_h, target_w = target
    crop_w = min(width, round(height * target_w / target_h))
    crop_h = min(height, round(width * target_h / target_w))
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def resize_pixels(pixels: np.ndarray, size: tuple[int, int] | None, interpolation: str = "bilinear",
                  crop_to_aspect_ratio: bool = False) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] resized to `size` (H, W); centre-cropped to its aspect ratio first when asked.
    The data stage and `tapeline predict` both resize through here."""
    if size is None or pixels.shape[:2] == tuple(size):
        return pixels
    from PIL import Image

    img = Image.fromarray(pixels)
    box = crop_box(img.width, img.height, size) if crop_to_aspect_ratio else None
    return np.asarray(img.resize((size[1], size[0]), _resample_filter(interpolation), box=box))


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """uint8 [H, W] or [H, W, 3] as [H, W, channels] (RGB to grey with Pillow's ITU-R 601 luma, as `predict`)."""
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if channels == 1:
        if pixels.ndim == 3:
            from PIL import Image

            pixels = np.asarray(Image.fromarray(pixels).convert("L"))
        return pixels[..., np.newaxis]
    return pixels if pixels.ndim == 3 else np.repeat(pixels[..., np.newaxis], 3, axis=-1)
