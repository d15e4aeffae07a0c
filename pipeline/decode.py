"""Image bytes -> HxWx3 uint8 RGB, or an :class:`ImageDecodeError` that says why not."""

from __future__ import annotations

import functools
import io
import warnings
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000  # decompression-bomb guard; SA-1B images are ~3.4 MP
# ISO base media brands of HEVC-coded HEIF (.heic/.heif: phone photos), which PIL reads only with
# the pillow-heif plugin. AVIF (AV1-coded) PIL reads itself.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})


class ImageDecodeError(ValueError):
    """The input is not a usable image; ``reason`` is a short machine-friendly code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def resized_size(width: int, height: int, short_side: Optional[int]) -> Tuple[int, int]:
    """(width, height) of an image downsampled so its shorter side is ``short_side`` (the
    aspect ratio kept, the longer side rounded); the size as it is when already that small or
    when ``short_side`` is None."""
    short = min(width, height)
    if short_side is None or short <= short_side:
        return width, height
    scale = short_side / short
    return ((short_side, max(1, round(height * scale))) if width <= height
            else (max(1, round(width * scale)), short_side))


def downsample(image: np.ndarray, short_side: Optional[int]) -> np.ndarray:
    """HxWx3 uint8 -> the image with its shorter side at most ``short_side``
    (Lanczos); the same array when it is already that small."""
    size = resized_size(image.shape[1], image.shape[0], short_side)
    if size == (image.shape[1], image.shape[0]):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, short_side: Optional[int] = None) -> np.ndarray:
    """Decode ``data`` with EXIF orientation applied and any mode converted to RGB, then, with
    ``short_side``, downsampled so its shorter side is at most that (:func:`downsample`). Of a
    file with several frames or pages (animated GIF/WebP/PNG, multi-page TIFF), the first.

    L/LA/P/RGBA/CMYK/YCbCr are converted by PIL (alpha dropped); 16- and 32-bit integer images
    are scaled to 8 bits. HEIF/HEIC (phone photos) needs the optional pillow-heif plugin
    (``sam-datagen[heif]``). Raises ImageDecodeError with reason ``empty``, ``not_an_image``,
    ``unsupported_format`` (a HEIF file without the plugin), ``too_large``, ``corrupt`` or
    ``unsupported_mode``.
    """
    return decode_first_frame(data, max_pixels, short_side)[0]


def decode_first_frame(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                       short_side: Optional[int] = None) -> Tuple[np.ndarray, int]:
    """(:func:`decode_image`, the number of frames or pages in the file: 1 for a still image; of
    a file damaged after its first frame, those before the damage)."""
    if not data:
        raise ImageDecodeError("empty", "the file has no bytes")
    heif = heif_brand(data)
    if heif and not heif_plugin():
        raise ImageDecodeError("unsupported_format", f"a HEIF/HEIC image (brand {heif!r}): reading it needs the "
                               "pillow-heif plugin on the workers: pip install 'sam-datagen[heif]'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        raise ImageDecodeError("not_an_image", "no image format recognised") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except Exception as e:  # PIL raises many types on damaged headers
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        raise ImageDecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w == 0 or h == 0:
        raise ImageDecodeError("empty", f"image size {w}x{h}")
    try:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    except ImageDecodeError:
        raise
    except Exception as e:
        raise ImageDecodeError("corrupt", f"{type(e).__name__}: {e}") from e
    return downsample(rgb, short_side), _frame_count(img)


def heif_brand(data: bytes) -> Optional[str]:
    """The HEVC brand (``"heic"``...) of a HEIF file's ``ftyp`` box, major or compatible; None
    for anything else."""
    if data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    brands = [data[8:12]] + [data[i : i + 4] for i in range(16, min(size, len(data), 256) - 3, 4)]
    return next((b.decode("latin-1") for b in brands if b in HEIF_BRANDS), None)


@functools.lru_cache(maxsize=None)
def heif_plugin() -> bool:
    """Whether PIL reads HEIF: registers pillow-heif's opener once, if it is installed."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _frame_count(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1))
    except Exception:  # counting walks the frames: a damaged one ends the count
        count = 1
        try:
            while True:
                img.seek(count)
                count += 1
        except Exception:
            return count


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else float(arr.max())
        gray = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.stack([gray] * 3, axis=-1))
    if img.mode == "F":
        raise ImageDecodeError("unsupported_mode", "floating-point (mode F) images have no defined 0-255 range")
    if img.mode not in ("RGB", "L", "LA", "P", "PA", "RGBA", "RGBX", "CMYK", "YCbCr", "1", "La"):
        raise ImageDecodeError("unsupported_mode", f"PIL mode {img.mode!r}")
    return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
