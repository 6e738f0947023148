"""Gemma 3's pan & scan: extra crops of a wide or tall image, each seen as an image of its own.

transformers' Gemma3ImageProcessor (`do_pan_and_scan`, off by default there and here) cuts an image
whose aspect ratio reaches `min_ratio_to_activate` into 2..`max_num_crops` equal strips along its long
side, about as many as the ratio (rounded half up), none narrower than `min_crop_size` pixels; the
prompt then holds the whole image and its crops ("Here is the original image ... and here are some
crops to help you see better ...", Gemma3Processor; see `mlx_gemma.vision.gemma3_prompt_ids`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from PIL import Image

from .arguments import is_integer, is_real
from .errors import ImageError


@dataclass(frozen=True)
class PanAndScan:
    """The processor's `pan_and_scan_*` settings; the defaults are Gemma3Processor's."""

    min_crop_size: int = 256  # pan_and_scan_min_crop_size: no crop narrower than this (pixels)
    max_num_crops: int = 4  # pan_and_scan_max_num_crops
    min_ratio_to_activate: float = 1.2  # pan_and_scan_min_ratio_to_activate: long side / short side

    def __post_init__(self):
        if not is_integer(self.min_crop_size) or self.min_crop_size < 1:
            raise ImageError("pan_and_scan", f"min_crop_size must be a positive integer, got {self.min_crop_size!r}")
        if not is_integer(self.max_num_crops) or self.max_num_crops < 1:
            raise ImageError("pan_and_scan", f"max_num_crops must be a positive integer, got {self.max_num_crops!r}")
        if not is_real(self.min_ratio_to_activate) or not 1 <= self.min_ratio_to_activate < math.inf:
            raise ImageError("pan_and_scan", "min_ratio_to_activate must be a finite number >= 1, "
                                             f"got {self.min_ratio_to_activate!r}")


def pan_and_scan_settings(value) -> PanAndScan | None:
    """None / False: off; True: the default settings; a PanAndScan or a dict of its fields."""
    if value is None or value is False:
        return None
    if value is True:
        return PanAndScan()
    if isinstance(value, PanAndScan):
        return value
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"min_crop_size", "max_num_crops", "min_ratio_to_activate"})
        if unknown:
            raise ImageError("pan_and_scan", f"unknown settings {unknown}")
        return PanAndScan(**value)
    raise ImageError("pan_and_scan", f"expected a bool, a PanAndScan or a dict, got {type(value).__name__}")


def crop_boxes(width: int, height: int, settings: PanAndScan) -> list[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of each crop, row by row, as Gemma3ImageProcessor's `pan_and_scan`
    cuts them (the last strip may be narrower: the reference's slices stop at the edge); [] for none."""
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side < settings.min_ratio_to_activate:
        return []
    n = int(math.floor(long_side / short_side + 0.5))  # the reference's "half round up"
    n = min(int(math.floor(long_side / settings.min_crop_size)), n)
    n = min(settings.max_num_crops, max(2, n))
    n_w, n_h = (n, 1) if width >= height else (1, n)  # square or landscape: strips side by side
    crop_w, crop_h = math.ceil(width / n_w), math.ceil(height / n_h)
    if min(crop_w, crop_h) < settings.min_crop_size:
        return []
    return [(x, y, min(x + crop_w, width), min(y + crop_h, height))
            for y, x in itertools.product(range(0, n_h * crop_h, crop_h), range(0, n_w * crop_w, crop_w))]


def crops(image: Image.Image, settings: PanAndScan | None) -> list[Image.Image]:
    """The crops of an RGB image (none when `settings` is None or the image is not wide or tall enough)."""
    if settings is None:
        return []
    return [image.crop(box) for box in crop_boxes(image.width, image.height, settings)]
