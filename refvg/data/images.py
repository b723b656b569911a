"""Opening images: a user's photo for inference, or a dataset image for `prepare`. They differ on
purpose:

- `open_photo` (refvg predict, the MLflow model): a phone stores the sensor's pixels plus an EXIF
  orientation tag, and every viewer shows the photo turned upright, so the box is wanted in that
  frame: the tag is applied (PIL's ImageOps.exif_transpose) and the box refers to the upright image.
- `open_dataset_image` (prepare): COCO/REFER boxes and masks refer to the stored pixel array, so the
  orientation tag is NOT applied (turning the image would move every annotation off its object).
  The resolved path must stay inside the image folder: a symlink leading out is refused as `../` is.

Both convert to RGB the same way (`to_rgb`): greyscale and CMYK are converted, 16-bit greyscale is
scaled (not clipped), and transparency is composited on a white background rather than dropped (the
colour under a fully transparent pixel is whatever the encoder left there). Both refuse a
decompression bomb: an image over PIL's `Image.MAX_IMAGE_PIXELS` (89.5 M pixels by default) is an
error, not a warning, naming the file.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)  # under transparent pixels
Source = Union[str, os.PathLike, bytes, bytearray]


class ImageReadError(ValueError):
    """An image that cannot be used, with the file (or row) and the reason in the message."""


class UnsafeImagePath(ImageReadError):
    """A dataset image whose resolved path leaves the image folder (a symlink leading out)."""


def open_photo(source: Source, name: str | None = None) -> Image.Image:
    """A user's image (a path, or the file's bytes) as RGB, upright by its EXIF orientation."""
    return to_rgb(_decoded(source, name, upright=True))


def open_dataset_image(path: Path, image_dir: Path | None = None) -> Image.Image:
    """A dataset image as RGB in its stored pixel frame (the one its annotations use); when
    `image_dir` is given, the file's resolved path must lie inside it."""
    if image_dir is not None:
        check_inside(path, image_dir)
    return to_rgb(_decoded(path, None, upright=False))


def check_inside(path: Path, image_dir: Path) -> None:
    """Refuse `path` when, symlinks resolved, it is not inside `image_dir` (resolved too)."""
    real, root = Path(path).resolve(), Path(image_dir).resolve()
    if not real.is_relative_to(root):
        raise UnsafeImagePath(f"{path}: resolves to {real}, outside the image folder {root}")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, keeping what the image shows (see the module docstring)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit greyscale (PNG, TIFF): PIL's own conversion clips at 255, which turns most of it
        # white.
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values / top * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK when it decodes), YCbCr, LAB
    return img.convert("RGB")


def _decoded(source: Source, name: str | None, upright: bool) -> Image.Image:
    in_memory = isinstance(source, (bytes, bytearray))
    label = name or (f"image of {len(source)} bytes" if in_memory else str(source))
    fp = io.BytesIO(source) if in_memory else source
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and twice that PIL only warns; a bomb is refused either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.load()  # decode fully now: a truncated file fails here, naming the file
                if upright:
                    # a new, loaded image (None only with in_place=True)
                    turned = ImageOps.exif_transpose(img)
                    return turned if turned is not None else img.copy()
                return img.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageReadError(
            f"{label}: refused as a possible decompression bomb ({err}); the limit is "
            f"PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS} pixels"
        ) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{label}: not an image (no image format PIL can read)") from None
    except FileNotFoundError:
        raise ImageReadError(f"{label}: no such file") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated/corrupt: PIL raises all three
        raise ImageReadError(f"{label}: {err}") from None
