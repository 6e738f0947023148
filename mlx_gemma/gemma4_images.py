"""Images in, Gemma 4 vision inputs out, as transformers 5.25 prepares them (videos: gemma4_video).

Gemma 4 sees an image at a variable resolution: it is resized, keeping its aspect ratio, to the
largest size whose sides are multiples of `pooling_kernel_size * patch_size` and that fits the
token budget (`max_soft_tokens`, each soft token being k x k patches), cut into flat patches in
row-major order, each with its (x, y) grid position, and padded to the budget's patch count
(positions -1).  The tower turns the real patches into `patches / k^2` soft tokens.

- `ImageSettings`: the image processor's settings (its `processor_config.json` entry), checked.
- `target_size`: the size an image is resized to (transformers' `get_aspect_ratio_preserving_size`).
- `preprocess_images`: images -> `Gemma4Images` (pixel values [B, max_patches, 3 p^2] in [0, 1],
  position ids [B, max_patches, 2], soft tokens per image), as `Gemma4ImageProcessorPil`.
- `expand_image_tokens`: a prompt's `<|image|>` placeholders -> `<|image>`, n x `<|image|>`,
  `<image|>` (Gemma4Processor's `replace_image_token`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import ConfigError, ImageError
from .json_input import expect
from .vision import load_image

# The budgets Gemma 4 was trained with (image_processing_gemma4.py `_SUPPORTED_SOFT_TOKENS`).
SUPPORTED_SOFT_TOKENS = (70, 140, 280, 560, 1120)
# The prompt's markers (the Gemma 4 tokenizer's image_token, boi_token, eoi_token).
IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<|image|>", "<|image>", "<image|>"
# Pillow's filter codes, as a processor file stores `resample` (3: bicubic, Gemma 4's).
_FILTERS = {int(f): f for f in Image.Resampling}


@dataclass(frozen=True)
class ImageSettings:
    patch_size: int = 16  # pixels per patch side (the tower's vision_config.patch_size)
    max_soft_tokens: int = 280  # token budget per image; one of SUPPORTED_SOFT_TOKENS
    pooling_kernel_size: int = 3  # k: the tower averages k x k patches into one soft token
    resample: int = 3  # Pillow filter code of the resize (3 = bicubic, the processor's default)
    do_rescale: bool = True  # pixels x rescale_factor (uint8 -> [0, 1])
    rescale_factor: float = 1 / 255
    do_normalize: bool = False  # (x - mean) / std per channel; off: Gemma 4 was trained on [0, 1]
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    extra: dict[str, Any] = field(default_factory=dict)  # processor keys we keep but do not interpret

    @property
    def max_patches(self) -> int:
        return self.max_soft_tokens * self.pooling_kernel_size**2

    @property
    def side_multiple(self) -> int:
        """Every resized side is a multiple of this: whole pooling windows of whole patches."""
        return self.pooling_kernel_size * self.patch_size

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "image_processor.") -> "ImageSettings":
        """From the processor file's image entry (`processor_config.json` "image_processor", or a flat
        `preprocessor_config.json`); switches we do not implement must keep their defaults."""
        expect(config, dict, path, where.rstrip(".") or "image_processor")
        known, extra = {}, {}
        for key, value in config.items():
            if key in _NUMBERS:
                known[key] = _number(value, _NUMBERS[key], path, where + key)
            elif key in ("do_rescale", "do_normalize"):
                known[key] = expect(value, bool, path, where + key)
            elif key in ("image_mean", "image_std"):
                known[key] = _channels(value, path, where + key)
            elif key in _FIXED:
                if value != _FIXED[key]:
                    raise ConfigError(path, f"{where}{key} = {value!r} is not supported (only {_FIXED[key]!r})")
            else:
                extra[key] = value
        try:
            return cls(**known, extra=extra)
        except ConfigError as e:
            raise ConfigError(path, where + e.problem) from e

    def __post_init__(self) -> None:
        # Refused at construction, as transformers' processor refuses an unsupported budget.
        if self.max_soft_tokens not in SUPPORTED_SOFT_TOKENS:
            raise ConfigError(None, f"max_soft_tokens must be one of {SUPPORTED_SOFT_TOKENS}, "
                                    f"got {self.max_soft_tokens!r}")
        if self.resample not in _FILTERS:
            raise ConfigError(None, f"resample must be a Pillow filter code {sorted(_FILTERS)}, got {self.resample!r}")
        if self.do_normalize and 0.0 in self.image_std:
            raise ConfigError(None, "image_std holds a zero")


# Integer settings (with their bounds) and the rescale factor, as read from a processor file.
_NUMBERS = {"patch_size": (int, 1, 1 << 10), "max_soft_tokens": (int, 1, 1 << 14),
            "pooling_kernel_size": (int, 1, 64), "resample": (int, 0, 5), "rescale_factor": (float, 0.0, 1.0)}
# Switches whose other values transformers accepts but this module does not implement.
_FIXED = {"do_resize": True, "do_convert_rgb": True}


def _number(value, spec, path, key):
    """A number of `spec` = (kind, low, high) within [low, high]; a float must be finite (and, with
    low 0.0, above it: a rescale factor of 0 would blank every image)."""
    kind, low, high = spec
    expect(value, kind, path, key)
    if not (low <= value <= high) or (kind is float and low == 0.0 and value == 0):
        raise ConfigError(path, f"{key} must be a number from {low} to {high}, got {value!r}")
    return kind(value)


def _channels(value, path, key) -> tuple[float, ...]:
    expect(value, list, path, key)
    if len(value) != 3:
        raise ConfigError(path, f"{key} must list 3 numbers (R, G, B), got {len(value)}")
    return tuple(float(_number(v, (float, -1e6, 1e6), path, f"{key}[{i}]")) for i, v in enumerate(value))


# ----- images ------------------------------------------------------------------------


def target_size(height: int, width: int, settings: ImageSettings = ImageSettings()) -> tuple[int, int]:
    """(height, width) an image of this size is resized to: its aspect ratio scaled to the patch
    budget, each side rounded down to a multiple of k * patch (image_processing_gemma4.py
    `get_aspect_ratio_preserving_size`; a side that rounds to 0 becomes one multiple and the other
    side floor(ratio) multiples, capped at the budget's longest row)."""
    if height <= 0 or width <= 0:
        raise ImageError("image", f"has no pixels ({width} x {height})")
    budget = settings.max_patches * settings.patch_size**2  # pixels
    factor = math.sqrt(budget / (height * width))
    step = settings.side_multiple
    h = int(math.floor(factor * height / step)) * step
    w = int(math.floor(factor * width / step)) * step
    longest = (settings.max_patches // settings.pooling_kernel_size**2) * step
    if h == 0 and w == 0:
        raise ImageError("image", f"a {width} x {height} image cannot be resized to whole {step}-pixel windows")
    if h == 0:
        h, w = step, min(int(math.floor(width / height)) * step, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * step, longest), step
    if h * w > budget:
        raise ImageError("image", f"a {width} x {height} image resized to {w} x {h} exceeds "
                                  f"{settings.max_patches} patches")
    return h, w


def image_pixels(image, settings: ImageSettings = ImageSettings(), name: str = "image") -> np.ndarray:
    """One image -> float32 [H, W, 3] at its target size: RGB (`vision.load_image`), Pillow resize,
    x * rescale_factor (in float64, rounded once to float32, as transformers' `rescale`)."""
    rgb = load_image(image, name)
    h, w = target_size(rgb.height, rgb.width, settings)
    if (h, w) != (rgb.height, rgb.width):
        rgb = rgb.resize((w, h), resample=_FILTERS[settings.resample])
    x = np.asarray(rgb)
    x = (x.astype(np.float64) * settings.rescale_factor).astype(np.float32) if settings.do_rescale else \
        x.astype(np.float32)
    if settings.do_normalize:  # in float32, as transformers' `normalize`
        x = (x - np.array(settings.image_mean, np.float32)) / np.array(settings.image_std, np.float32)
    return x


def patchify(pixels: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[H, W, C] -> (patches [N, p * p * C], positions [N, 2]): patches in row-major order, each
    flattened row by row with channels last; positions are (x, y) = (column, row) in the patch grid
    (image_processing_gemma4.py `convert_image_to_patches` and its meshgrid "xy")."""
    H, W, C = pixels.shape
    rows, cols = H // patch_size, W // patch_size
    patches = pixels.reshape(rows, patch_size, cols, patch_size, C).transpose(0, 2, 1, 3, 4)
    x, y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
    positions = np.stack([x, y], axis=-1).reshape(rows * cols, 2)
    return patches.reshape(rows * cols, -1), positions.astype(np.int32)


def pad_patches(patches: np.ndarray, positions: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to `length` patches: zeros, and position (-1, -1), which marks padding for the tower."""
    n = length - len(patches)
    if n <= 0:
        return patches, positions
    return (np.concatenate([patches, np.zeros((n, patches.shape[1]), patches.dtype)]),
            np.concatenate([positions, np.full((n, 2), -1, positions.dtype)]))


@dataclass
class Gemma4Images:
    pixel_values: mx.array  # [B, max_patches, 3 * patch^2] float32, padding rows zero
    position_ids: mx.array  # [B, max_patches, 2] int32 (x, y) per patch, (-1, -1) for padding
    num_soft_tokens: list[int]  # soft tokens each image becomes (its real patches / k^2)


def preprocess_images(images, settings: ImageSettings = ImageSettings()) -> Gemma4Images:
    """Images (one or a list: paths, PIL images or arrays) -> the tower's inputs, one row each."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ImageError("images", "no images given")
    rows, positions, tokens = [], [], []
    for i, image in enumerate(images):
        patches, pos = patchify(image_pixels(image, settings, f"images[{i}]"), settings.patch_size)
        tokens.append(len(patches) // settings.pooling_kernel_size**2)
        patches, pos = pad_patches(patches, pos, settings.max_patches)
        rows.append(patches)
        positions.append(pos)
    return Gemma4Images(mx.array(np.stack(rows)), mx.array(np.stack(positions)), tokens)


def image_block(num_soft_tokens: int) -> str:
    """One image's prompt text: `<|image>`, its soft tokens, `<image|>` (processing_gemma4.py)."""
    return BOI_TOKEN + IMAGE_TOKEN * num_soft_tokens + EOI_TOKEN


def expand_image_tokens(text: str | None, num_soft_tokens: list[int]) -> str:
    """Each `<|image|>` placeholder in `text`, in order, -> its image's block; no text (None or "")
    means the images alone, blocks joined by " " (Gemma4Processor's `prepare_inputs_layout`)."""
    if not text:
        text = " ".join([IMAGE_TOKEN] * len(num_soft_tokens))
    parts = text.split(IMAGE_TOKEN)
    if len(parts) - 1 != len(num_soft_tokens):
        raise ImageError("image", f"the prompt holds {len(parts) - 1} {IMAGE_TOKEN} placeholders for "
                                  f"{len(num_soft_tokens)} image(s); give one image per placeholder")
    out = [parts[0]]
    for n, rest in zip(num_soft_tokens, parts[1:]):
        out += [image_block(n), rest]
    return "".join(out)
