"""Decode one raw image (JPEG, PNG, WebP, GIF, BMP, TIFF) into the RGB uint8 tensor the detector takes.

Runs inside DataLoader workers, so everything here is per-image CPU work: decode, convert to
RGB, and shrink huge images to the size the detector would resize them to anyway (moving that
work off the process that runs the detector, and bounding memory for 10000x10000 images).
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

WHITE = (255, 255, 255, 255)


class RejectedSample(Exception):
    """A raw sample that cannot be turned into a feature sample; ``reason`` goes to skipped.parquet."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    pixels: torch.Tensor  # uint8 [3, h, w], possibly downscaled
    width: int  # original width in pixels
    height: int  # original height in pixels

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Multiply boxes in ``pixels`` coordinates by this to get original-image pixels."""
        return self.width / self.pixels.shape[2], self.height / self.pixels.shape[1]


def detector_scale(width: int, height: int, min_size: int, max_size: int) -> float:
    """The resize factor a Faster R-CNN transform applies: short side to min_size, long side <= max_size."""
    return min(min_size / min(width, height), max_size / max(width, height))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB. Transparency is composited on white (not dropped: dropping alpha
    exposes whatever colour the encoder left in fully transparent pixels, often black)."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: PIL's convert() would clip at 255; keep the top 8 bits instead.
        grey = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    # CMYK (Adobe-inverted JPEGs are already un-inverted by PIL), L, 1, P, YCbCr, LAB, I, F.
    return image.convert("RGB")


def decode_image(
    data: bytes, max_image_pixels: int, min_size: int, max_size: int, downscale: bool = True
) -> DecodedImage:
    """Decode ``data`` or raise ``RejectedSample`` (empty_image, corrupt_image, truncated_image,
    image_too_large). With ``downscale``, images larger than the detector's input size are shrunk
    to it here (JPEGs via DCT-domain draft decoding, which never materialises the full image)."""
    if not data:
        raise RejectedSample("empty_image", "image member has 0 bytes")
    try:
        with warnings.catch_warnings():
            # Our own max_image_pixels check below replaces PIL's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise RejectedSample("corrupt_image", f"image size {width}x{height}")
            if width * height > max_image_pixels:
                raise RejectedSample(
                    "image_too_large", f"{width}x{height} = {width * height} pixels > max_image_pixels={max_image_pixels}"
                )
            scale = detector_scale(width, height, min_size, max_size) if downscale else 1.0
            if scale < 1.0 and image.format == "JPEG":
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image.load()
            image = to_rgb(image)
    except Image.DecompressionBombError as err:
        raise RejectedSample("image_too_large", str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        message = str(err) or err.__class__.__name__
        reason = "truncated_image" if "truncated" in message.lower() else "corrupt_image"
        raise RejectedSample(reason, message) from None
    except Exception as err:  # malformed files make Pillow's parsers raise almost anything (struct.error, IndexError, ...)
        raise RejectedSample("corrupt_image", f"{err.__class__.__name__}: {err}") from None
    if scale < 1.0:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        if image.size != target:
            image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return DecodedImage(pixels=pixels, width=width, height=height)
