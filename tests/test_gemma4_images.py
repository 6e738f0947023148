"""Gemma 4's image preprocessing against transformers 5.25 (video frames: test_gemma4_video.py).

References, live: `Gemma4ImageProcessorPil` (transformers' backend without torchvision, which the
references do not install), `get_aspect_ratio_preserving_size`, `Gemma4Processor`'s placeholder
expansion (its input ids for our text and its own).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

from mlx_gemma.errors import ConfigError, ImageError
from mlx_gemma.gemma4_images import (
    SUPPORTED_SOFT_TOKENS,
    ImageSettings,
    expand_image_tokens,
    image_block,
    preprocess_images,
    target_size,
)


def smooth(h: int, w: int, phase: float = 0.0) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rgb = np.stack([np.sin(7 * x + phase), np.cos(5 * y - phase), np.sin(3 * (x + y) + phase)], -1)
    return Image.fromarray(((rgb + 1) * 127.5).round().astype(np.uint8))


def noise(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = {  # (height, width) in the names
    "noise 480x640": lambda: noise(480, 640, 0),
    "smooth wide 90x700": lambda: smooth(90, 700, 0.5),
    "noise tall 900x120": lambda: noise(900, 120, 1),
    "smooth tiny 7x5": lambda: smooth(7, 5, 1.0),
    "noise large 1800x2400": lambda: noise(1800, 2400, 2),
    "exact fit 672x960": lambda: smooth(672, 960, 2.0),  # already 42 x 60 patches: not resized
    "strip 3x2000": lambda: noise(3, 2000, 3),  # one side rounds to 0 windows
    "grey 200x300": lambda: noise(200, 300, 4).convert("L"),
    "transparent 150x100": lambda: Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (150, 100, 4), dtype=np.uint8), "RGBA"),  # over white
}


def hf_processor(**settings):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # torch: oracle only

    return Gemma4ImageProcessorPil(**settings)


@pytest.mark.oracle
@pytest.mark.parametrize("budget", [280, 70])
def test_pixels_positions_and_token_counts_equal_transformers(budget):
    images = [make() for make in IMAGES.values()]
    ours = preprocess_images(images, ImageSettings(max_soft_tokens=budget))
    ref = hf_processor(max_soft_tokens=budget)(images, return_tensors="np")
    assert ours.num_soft_tokens == [int(n) for n in ref["num_soft_tokens_per_image"]]
    assert np.array_equal(np.array(ours.position_ids), ref["image_position_ids"])
    assert ours.pixel_values.shape == ref["pixel_values"].shape == (len(images), budget * 9, 768)
    assert np.abs(np.array(ours.pixel_values) - ref["pixel_values"]).max() <= 1e-6


@pytest.mark.oracle
def test_other_patch_and_pooling_sizes_equal_transformers():
    images = [noise(50, 70, 4), smooth(84, 120), noise(3, 5, 5)]
    settings = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)
    ours = preprocess_images(images, ImageSettings(**settings))
    ref = hf_processor(**settings)(images, return_tensors="np")
    assert ours.num_soft_tokens == [int(n) for n in ref["num_soft_tokens_per_image"]] == [63, 70, 60]
    assert np.array_equal(np.array(ours.position_ids), ref["image_position_ids"])
    assert np.abs(np.array(ours.pixel_values) - ref["pixel_values"]).max() <= 1e-6


@pytest.mark.oracle
def test_target_size_equals_transformers_for_every_budget():
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size  # oracle

    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 5000), (5000, 1), (2, 3000), (47, 48), (768, 768), (3000, 4000)]
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, 2)) for _ in range(200)]
    for budget in SUPPORTED_SOFT_TOKENS:
        settings = ImageSettings(max_soft_tokens=budget)
        for h, w in sizes:
            assert target_size(h, w, settings) == get_aspect_ratio_preserving_size(
                h, w, patch_size=16, max_patches=settings.max_patches, pooling_kernel_size=3), (budget, h, w)


def test_positions_are_column_row_and_padding_is_minus_one():
    settings = ImageSettings(max_soft_tokens=70)
    assert target_size(100, 150, settings) == (288, 480)  # 18 x 30 patches: 60 tokens of 70
    out = preprocess_images(smooth(100, 150), settings)
    positions = np.array(out.position_ids)[0]
    assert out.num_soft_tokens == [60] and positions.shape == (630, 2)
    assert positions[:31].tolist() == [[x, 0] for x in range(30)] + [[0, 1]]
    assert positions[539].tolist() == [29, 17] and (positions[540:] == -1).all()
    assert not np.array(out.pixel_values)[0, 540:].any()
    assert out.pixel_values.dtype == mx.float32 and out.position_ids.dtype == mx.int32


def test_a_patch_is_its_pixels_row_by_row_channels_last():
    pixels = np.random.default_rng(1).integers(0, 256, (336, 480, 3), dtype=np.uint8)  # 21 x 30 patches: as is
    out = np.array(preprocess_images(pixels, ImageSettings(max_soft_tokens=70)).pixel_values)[0]
    patch = pixels[16:32, 32:48].astype(np.float64) / 255  # row 1, column 2 of the 30-wide grid
    assert np.array_equal(out[30 + 2], patch.reshape(-1).astype(np.float32))


@pytest.mark.oracle
def test_expansion_and_token_ids_equal_the_processor(monkeypatch):
    from transformers import Gemma4Processor, GemmaTokenizer  # oracle: tokenizes as the processor does
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    tokenizer = GemmaTokenizer(
        vocab_file=str(FIXTURES / "tokenizer" / "tokenizer.model"),
        extra_special_tokens={"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                              "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"})
    # Its video processor needs torchvision, which the references do not install; images do not use it.
    monkeypatch.setattr(Gemma4Processor, "check_argument_for_proper_class", lambda self, name, arg: None)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), tokenizer=tokenizer,
                                image_processor=hf_processor(max_soft_tokens=70), video_processor=None)
    images = [noise(100, 300, 6), smooth(300, 100)]
    tokens = preprocess_images(images, ImageSettings(max_soft_tokens=70)).num_soft_tokens
    for text in ["Compare <|image|> with <|image|>.", None]:
        ref = processor(text=[text] if text else None, images=[images])
        assert tokenizer(expand_image_tokens(text, tokens))["input_ids"] == ref["input_ids"][0]


def test_expansion_text_and_placeholder_count():
    assert image_block(2) == "<|image><|image|><|image|><image|>"
    assert expand_image_tokens("a <|image|> b", [1]) == "a <|image><|image|><image|> b"
    assert expand_image_tokens("", [1, 1]) == "<|image><|image|><image|> <|image><|image|><image|>"
    with pytest.raises(ImageError, match="placeholders"):
        expand_image_tokens("a <|image|> b", [1, 2])


@pytest.mark.oracle
def test_settings_read_the_processors_own_dict():
    settings = ImageSettings.from_dict(json.loads(hf_processor(max_soft_tokens=560).to_json_string()))
    assert (settings.max_soft_tokens, settings.patch_size, settings.pooling_kernel_size) == (560, 16, 3)
    assert settings.resample == 3 and settings.rescale_factor == 1 / 255 and not settings.do_normalize
    assert settings.extra["image_processor_type"] == "Gemma4ImageProcessor"


def test_settings_keep_unknown_keys_and_refuse_bad_values():
    assert ImageSettings.from_dict({"max_soft_tokens": 140, "new_key": 1}).extra == {"new_key": 1}
    bad = [{"max_soft_tokens": 100}, {"patch_size": 0}, {"patch_size": "16"}, {"resample": 9},
           {"rescale_factor": 0.0}, {"image_mean": [0.5, 0.5]}, {"do_normalize": "yes"},
           {"do_resize": False}, {"do_normalize": True, "image_std": [1.0, 0.0, 1.0]}, []]
    for config in bad:
        with pytest.raises(ConfigError, match="processor_config.json"):
            ImageSettings.from_dict(config, path="processor_config.json")
    with pytest.raises(ConfigError, match="max_soft_tokens"):
        ImageSettings(max_soft_tokens=100)


def test_normalize_when_asked():
    image = noise(48, 96, 7)
    plain = np.array(preprocess_images(image, ImageSettings(max_soft_tokens=70)).pixel_values)
    normed = ImageSettings(max_soft_tokens=70, do_normalize=True, image_mean=(0.5,) * 3, image_std=(0.25,) * 3)
    np.testing.assert_allclose(np.array(preprocess_images(image, normed).pixel_values)[0, :18],
                               (plain[0, :18] - 0.5) / 0.25, atol=1e-6)


def test_bad_images_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="no images"):
        preprocess_images([])
    with pytest.raises(ImageError, match="expected a path"):
        preprocess_images([object()])
    with pytest.raises(ImageError, match="no such image"):
        preprocess_images(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(ImageError, match="junk.png"):
        preprocess_images(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="no pixels"):
        target_size(0, 10)
