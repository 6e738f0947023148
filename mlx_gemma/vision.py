"""Images in, PaliGemma and Gemma 3 inputs out; PaliGemma's detection and segmentation text back to boxes.

- `load_image`: a path, PIL image or array -> an RGB PIL image (EXIF orientation
  applied, transparency composited over white, decompression bombs refused).
- `preprocess_image(s)`: -> pixels [H, W, 3] / [N, H, W, 3] in [-1, 1] at the
  model's square size (bicubic, as Hugging Face's SiglipImageProcessor; bilinear
  as an option).
- `prompt_inputs`: prompts + images -> `[<image> x N] <bos> prompt "\\n"` ids (PaliGemma), or
  `<bos>` and the prompt with `"\\n\\n<start_of_image>"`, soft tokens, `"<end_of_image>\\n\\n"`
  for each image (Gemma 3; with pan & scan crops, `mlx_gemma.pan_and_scan`), left-padded, and the pixel
  values, as transformers' processors lay them out.
- `parse_detections` / `draw_detections`: `<locYYYY>` boxes (and `<segNNN>` codes)
  in generated text -> pixel boxes in the original image, drawn on it.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .pan_and_scan import PanAndScan, crops, pan_and_scan_settings
from .tensorfile import atomic_path

# Refused before decoding: a 64-megapixel image is already 8192 x 8192, and a
# PNG or JPEG header can claim far more than its few bytes hold.
MAX_IMAGE_PIXELS = 1 << 26
MAX_IMAGE_BYTES = 256 << 20
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


# ----- loading -----------------------------------------------------------------------


def _open_file(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageError(path, "no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(path, f"is {path.stat().st_size} bytes; images over {MAX_IMAGE_BYTES} bytes are refused")
    try:
        # Our own file object: closed on every path, errors included (load() detaches the image).
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(f)  # reads the header only
            _check_pixels(image, path)
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(path, "not an image Pillow can read (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(path, f"corrupt or truncated image: {e}") from e
    return image


def _check_pixels(image: Image.Image, where) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(where, f"image has no pixels ({w} x {h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(where, f"image is {w} x {h} pixels; over {MAX_IMAGE_PIXELS} pixels is refused")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, transparency composited over white (transformers' `convert_to_rgb`)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(image, name: str = "image") -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a uint8 array [H, W(, C)].

    EXIF orientation is applied, as transformers' `load_image` does.  Arrays may be
    float in [0, 1] or [0, 255] too (see `_unit_range`); they are rounded to 8 bits.
    """
    if isinstance(image, (str, os.PathLike)):
        where = Path(image)
        image = _open_file(where)
    elif isinstance(image, Image.Image):
        where = name
        _check_pixels(image, where)
    elif isinstance(image, np.ndarray):
        return Image.fromarray(_uint8_array(image, name)).convert("RGB")
    else:
        raise ImageError(name, f"expected a path, a PIL image or a numpy array, got {type(image).__name__}")
    try:
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError) as e:  # a malformed EXIF block
        raise ImageError(where, f"unreadable EXIF data: {e}") from e
    try:
        return to_rgb(image)
    except ValueError as e:  # modes Pillow cannot convert (La, I;16B, ...)
        raise ImageError(where, f"an image in mode {image.mode} cannot be made RGB: {e}") from e


def _unit_range(array: np.ndarray, name: str) -> np.ndarray:
    """An image array -> float32 RGB [H, W, 3] in [0, 1].

    Integer arrays and float arrays with values over 1 are read as [0, 255],
    other floats as [0, 1]; grey is repeated, alpha composited over white.
    """
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ImageError(name, f"an image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]; got {array.shape}")
    if array.shape[0] * array.shape[1] == 0 or array.shape[0] * array.shape[1] > MAX_IMAGE_PIXELS:
        raise ImageError(name, f"image array of {array.shape[1]} x {array.shape[0]} pixels is empty or too large")
    integer = np.issubdtype(array.dtype, np.integer)
    if not (integer or np.issubdtype(array.dtype, np.floating)):
        raise ImageError(name, f"image array has dtype {array.dtype}; expected integers or floats")
    x = array.astype(np.float32)
    if not np.isfinite(x).all():
        raise ImageError(name, "image array holds NaN or infinity")
    lo, hi = float(x.min()), float(x.max())
    scale = 255.0 if integer or hi > 1.0 else 1.0
    if lo < 0 or hi > scale:
        raise ImageError(name, f"image values span [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255]")
    x = x / scale
    if x.ndim == 2:
        return np.repeat(x[..., None], 3, axis=-1)
    if x.shape[-1] == 4:  # over white, as for PIL images
        return x[..., :3] * x[..., 3:] + (1.0 - x[..., 3:])
    return x


def _uint8_array(array: np.ndarray, name: str) -> np.ndarray:
    return np.round(_unit_range(array, name) * 255.0).astype(np.uint8)


# ----- preprocessing -----------------------------------------------------------------


def preprocess_image(image, size: int, resample: str = "bicubic", name: str = "image") -> np.ndarray:
    """One image -> float32 [size, size, 3] in [-1, 1].

    Resized (stretched, no crop) to a square with Pillow, then x / 127.5 - 1 (the
    mean 0.5 / std 0.5 normalisation of PaliGemma's processor).  Bicubic matches
    Hugging Face's SiglipImageProcessor; "bilinear" is what big_vision trained with.
    Arrays are rounded to 8 bits first, as that processor does when it hands an
    array to Pillow, so float and uint8 versions of an image give the same pixels.
    """
    if resample not in RESAMPLE:
        raise ImageError("resample", f"must be one of {sorted(RESAMPLE)}, got {resample!r}")
    rgb = load_image(image, name).resize((size, size), resample=RESAMPLE[resample])
    return (np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


def preprocess_images(images, size: int, resample: str = "bicubic") -> mx.array:
    """Images (one or a list) -> pixel values [N, size, size, 3] in [-1, 1]."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ImageError("images", "no images given")
    return mx.array(np.stack([
        preprocess_image(im, size, resample, name=f"images[{i}]") for i, im in enumerate(images)
    ]))


# ----- prompts -----------------------------------------------------------------------


def prompt_ids(tokenizer, prompt: str, num_image_tokens: int, image_token_id: int) -> list[int]:
    """`[<image> x N] <bos> prompt "\\n"` (transformers' PaliGemmaProcessor: the text and
    its newline are tokenized together, special-token look-alikes stay text).

    `image_token_id` is the model config's: Google's SentencePiece file has no
    `<image>` piece, the processor appends it after the last one (id 257152).
    """
    return [image_token_id] * num_image_tokens + [tokenizer.bos_id] + tokenizer.encode(prompt + "\n", add_bos=False)


def gemma3_prompt_ids(tokenizer, prompt: str, n_images: int, spec, crops: Sequence[int] | None = None) -> list[int]:
    """`<bos>` and the prompt with each `<start_of_image>` in it replaced by `"\\n\\n<start_of_image>"`,
    the image's soft tokens and `"<end_of_image>\\n\\n"`, as transformers' Gemma3Processor lays it out.

    A prompt without `<start_of_image>` gets its images first (one marker each, as the chat
    template places them before the text).  `crops[i]` pan & scan crops follow image i
    (`image_segments`).  The text between the image blocks is tokenized run by run with its
    special tokens parsed, as the processor's tokenizer splits at them.
    """
    parts = text_between_images(prompt, tokenizer.id_to_piece(spec.start_id), n_images)
    crops = list(crops) if crops is not None else [0] * n_images
    segments: list = []
    for i, text in enumerate(parts):
        segments.append(text)
        if i < n_images:
            segments += image_segments(spec, crops[i])
    ids = [tokenizer.bos_id]
    for is_text, run in itertools.groupby(segments, key=lambda s: isinstance(s, str)):
        ids += tokenizer.encode("".join(run), add_bos=False, parse_special=True) if is_text else list(run)
    return ids


def image_segments(spec, n_crops: int = 0) -> list:
    """Gemma3Processor's text (str) and ids (int) for one image and its `n_crops` pan & scan crops:
    `"\\n\\n<start_of_image>"` + soft tokens + `"<end_of_image>\\n\\n"` (a block); with crops, "Here
    is the original image " + block + " and here are some crops to help you see better " + the crops'
    blocks joined by " " (its `replace_image_token`)."""
    block = ["\n\n", spec.start_id, *[spec.token_id] * spec.num_tokens, spec.end_id, "\n\n"]
    if not n_crops:
        return block
    out = ["Here is the original image ", *block, " and here are some crops to help you see better "]
    for i in range(n_crops):
        out += [" "] * bool(i) + block
    return out


def text_between_images(prompt: str, marker: str, n_images: int) -> list[str]:
    """The text before, between and after `n_images` images placed at each `marker` in `prompt`
    (or, without markers, all first: the chat template places them before the text)."""
    parts = prompt.split(marker)
    if len(parts) == 1:
        parts = [""] * n_images + [prompt]
    if len(parts) - 1 != n_images:
        raise ImageError("image", f"the prompt holds {len(parts) - 1} {marker} markers for {n_images} image(s); "
                                  "give one image per marker (or no marker: the images then come first)")
    return parts


def prompt_rows(model, tokenizer, prompts, images, resample: str | None = None,
                pan_and_scan=None) -> tuple[list[list[int]], mx.array]:
    """(token ids per prompt, pixel values [N, H, W, 3]) for a model that takes images.

    PaliGemma: one image per prompt, or a single image for every prompt.  Gemma 3: each
    prompt's entry may also be a list of images (several per prompt, each at one
    `<start_of_image>` of the prompt); the pixels are every prompt's images in order, each
    followed by its crops with `pan_and_scan` (True, or a `PanAndScan`: Gemma 3 only, off by default).
    `resample` defaults to the model's processor: bicubic (PaliGemma), bilinear (Gemma 3).
    """
    settings = pan_and_scan_settings(pan_and_scan)
    spec = model.image_input
    if spec is None:
        raise ImageError("image", f"a {model.model_type} model takes no images; use a PaliGemma or a Gemma 3 "
                                  "vision-language model")
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise ImageError("image", "prompts that go with images must be strings (e.g. 'caption en')")
    if not isinstance(images, (list, tuple)):
        images = [images] * len(prompts)
    if len(images) != len(prompts):
        raise ImageError("image", f"{len(images)} images for {len(prompts)} prompts; give one image per prompt")
    if spec.start_id is None:  # PaliGemma: one image, before <bos>
        if settings is not None:
            raise ImageError("pan_and_scan", "pan & scan is Gemma 3's (its processor's); PaliGemma takes one image")
        rows = [prompt_ids(tokenizer, p, spec.num_tokens, spec.token_id) for p in prompts]
        return rows, preprocess_images(list(images), spec.image_size, resample or "bicubic")
    per_prompt = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    flat, n_crops = with_crops([im for ims in per_prompt for im in ims], settings)
    rows, seen = [], 0
    for p, ims in zip(prompts, per_prompt):
        rows.append(gemma3_prompt_ids(tokenizer, p, len(ims), spec, n_crops[seen:seen + len(ims)]))
        seen += len(ims)
    return rows, preprocess_images(flat, spec.image_size, resample or "bilinear")


def with_crops(images: list, settings: PanAndScan | None) -> tuple[list, list[int]]:
    """Each image followed by its pan & scan crops (cut from the RGB image, EXIF orientation
    applied, as the processor cuts its converted array), and how many crops each has."""
    if settings is None:
        return images, [0] * len(images)
    flat, counts = [], []
    for i, image in enumerate(images):
        rgb = load_image(image, f"images[{i}]")
        extra = crops(rgb, settings)
        flat += [rgb, *extra]
        counts.append(len(extra))
    return flat, counts


def prompt_inputs(model, tokenizer, prompts, images, resample: str | None = None, pan_and_scan=None):
    """(input_ids [B, T], pixel_values [N, H, W, 3], left_padding [B]) for `model(...)`.

    Rows are left-padded with <pad> to the longest; pass `padding_mask` (or the
    cache's `left_padding`) so the model ignores the pads.
    """
    rows, pixels = prompt_rows(model, tokenizer, prompts, images, resample, pan_and_scan)
    T = max(len(r) for r in rows)
    padding = [T - len(r) for r in rows]
    ids = mx.array([[tokenizer.pad_id] * n + r for n, r in zip(padding, rows)], dtype=mx.int32)
    return ids, pixels, mx.array(padding, dtype=mx.int32)


# ----- detection and segmentation output ---------------------------------------------

_LOC = r"<loc(\d{4})>"
_DETECTION = re.compile(rf"{_LOC}{_LOC}{_LOC}{_LOC}((?:<seg\d{{3}}>){{16}})?\s*([^;<]*)")
_SEG = re.compile(r"<seg(\d{3})>")


@dataclass
class Detection:
    label: str
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in the original image's pixels
    segmentation: tuple[int, ...] | None = None  # 16 codebook indices of the mask VAE, if given


def parse_detections(text: str, image_size: tuple[int, int]) -> list[Detection]:
    """`<locYYYY>` quadruples (y_min, x_min, y_max, x_max), each optionally followed
    by 16 `<segNNN>` tokens, then a label, separated by " ; ".

    `image_size` is the original image's (width, height).  Bins 0..1023 span the
    whole side: big_vision encodes a coordinate v in [0, 1] as round(v * 1023) and
    decodes bin / 1023 (big_vision/pp/proj/paligemma/segmentation.py and
    evaluators/proj/paligemma/transfers/segmentation.py).  Malformed pieces
    (fewer than 4 locations, out-of-range bins) are skipped, as generation can
    produce them.
    """
    width, height = image_size
    out = []
    for m in _DETECTION.finditer(text):
        y0, x0, y1, x1 = (int(g) for g in m.groups()[:4])
        if max(y0, x0, y1, x1) > 1023:
            continue
        seg = None
        if m.group(5):
            seg = tuple(int(s) for s in _SEG.findall(m.group(5)))
            if max(seg) > 127:
                continue
        box = (x0 / 1023 * width, y0 / 1023 * height, x1 / 1023 * width, y1 / 1023 * height)
        out.append(Detection(m.group(6).strip(), box, seg))
    return out


def draw_detections(image, detections: Sequence[Detection], path=None, width: int = 3) -> Image.Image:
    """Draw each box and its label on (a copy of) the image; save a PNG at `path` (atomically) if given."""
    canvas = load_image(image).copy()
    draw = ImageDraw.Draw(canvas)
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
    for i, det in enumerate(detections):
        color = palette[i % len(palette)]
        x0, y0, x1, y1 = det.box
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=color, width=width)
        if det.label:
            left, top, right, bottom = draw.textbbox((x0, y0), det.label)
            ty = max(0, y0 - (bottom - top) - 2)
            draw.rectangle([x0, ty, x0 + (right - left) + 4, ty + (bottom - top) + 2], fill=color)
            draw.text((x0 + 2, ty), det.label, fill=(255, 255, 255))
    if path is not None:
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
    return canvas
