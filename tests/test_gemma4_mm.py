"""Gemma 4 with images and audio (models/gemma4_mm.py, mlx_gemma/gemma4_prompts.py, generate's media paths)
against transformers 5.25's Gemma4ForConditionalGeneration and Gemma4Processor.

The fixture (tests/fixtures/make_tiny_gemma4_mm.py) holds a tiny random model with both towers and,
per case, the processor's ids and media inputs, transformers' normed last hidden states at every
position and its logits at every 10th position and the last.
"""

from __future__ import annotations

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.errors import AudioError, ImageError
from mlx_gemma.loading import load_model
from mlx_gemma.models import gemma4_mm

from conftest import FIXTURES

FOLDER = FIXTURES / "tiny_gemma4_mm"
CASES = ("one", "two", "batch", "audio", "both", "chat")
MEDIA_OF = {"both": ("one", "audio"), "chat": ("one", "audio")}  # stored once, under these cases


@pytest.fixture(scope="module")
def model():
    return load_model(FOLDER)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FOLDER / "reference.npz"))


def media(ref, case: str) -> dict:
    """The processor's media inputs of `case`, as model keywords."""
    image_case, audio_case = MEDIA_OF.get(case, (case, case))
    out = {}
    if f"{image_case}_pixel_values" in ref and case != "audio":
        out["pixel_values"] = mx.array(ref[f"{image_case}_pixel_values"].astype(np.float32) / 255.0)
        out["image_positions"] = mx.array(ref[f"{image_case}_image_position_ids"])
    if f"{audio_case}_input_features" in ref and f"{case}_mm_token_type_ids" in ref \
            and (ref[f"{case}_mm_token_type_ids"] == 3).any():
        out["audio_features"] = mx.array(ref[f"{audio_case}_input_features"])
        out["audio_mask"] = mx.array(ref[f"{audio_case}_input_features_mask"])
    return out


def rel(ours: mx.array, theirs: np.ndarray) -> float:
    return float(np.abs(np.array(ours) - theirs).max() / np.abs(theirs).max())


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(model, ref, case):
    """One image, two images, a padded batch, one clip, an image and a clip, a chat: the normed
    hidden states at every position and the logits within 1e-4 of transformers' scale."""
    ids = mx.array(ref[f"{case}_input_ids"])
    padding = mx.array(ref[f"{case}_attention_mask"].astype(bool))
    hidden = model.model(ids, padding_mask=padding, **media(ref, case))
    real = ref[f"{case}_attention_mask"].astype(bool)
    # Padding positions are masked out and mean nothing (transformers' differ too): compare real ones.
    assert rel(hidden * padding[..., None], ref[f"{case}_hidden"] * real[..., None]) < 1e-4
    logits = model.logits(hidden)[:, mx.array(ref[f"{case}_positions"])]
    keep = real[:, ref[f"{case}_positions"]]
    assert rel(logits * mx.array(keep)[..., None], ref[f"{case}_logits"] * keep[..., None]) < 1e-4


def test_every_case_holds_the_media_it_claims(ref):
    """The cases exercise what they are named for: images, two images, audio, both, a padded batch."""
    types = {case: ref[f"{case}_mm_token_type_ids"] for case in CASES}
    assert (types["one"] == 1).sum() > 0 and not (types["one"] == 3).any()
    assert (types["audio"] == 3).sum() > 0 and not (types["audio"] == 1).any()
    assert (types["both"] == 1).any() and (types["both"] == 3).any() and (types["chat"] == 3).any()
    assert ref["two_pixel_values"].shape[0] == 2 and ref["batch_pixel_values"].shape[0] == 3
    assert not ref["batch_attention_mask"].all()


def test_sliding_layers_let_an_image_see_itself(model, ref):
    """With use_bidirectional_attention "vision", an image's first soft token depends on its last
    (sliding layers only): the hidden states differ from a causal run, and transformers' match ours."""
    assert model.args.text.use_bidirectional_attention == "vision"
    ids = mx.array(ref["one_input_ids"])
    inputs = media(ref, "one")
    h = model.model.embed(ids, **inputs)
    ours = model.model(ids, input_embeddings=h)
    causal = model.model.language_model(model.model.text_ids(ids), input_embeddings=h)
    first = int(np.argmax(ref["one_mm_token_type_ids"][0] == 1))
    assert float(mx.abs(ours[0, first] - causal[0, first]).max()) > 1e-3
    assert rel(ours, ref["one_hidden"]) < 1e-4


def test_media_count_mismatches_are_typed_errors(model, ref):
    ids = mx.array(ref["two_input_ids"])
    two = media(ref, "two")
    one = {k: v[:1] for k, v in two.items()}
    with pytest.raises(ImageError, match="placeholders"):  # fewer images than placeholders
        model.model(ids, **one)
    ids_one = mx.array(ref["one_input_ids"])
    with pytest.raises(ImageError, match="placeholders"):  # more images than placeholders
        model.model(ids_one, **two)
    with pytest.raises(ImageError, match="no images"):
        model.model(ids_one)
    audio = media(ref, "audio")
    with pytest.raises(AudioError, match="placeholders"):  # a clip for a prompt without audio placeholders
        model.model(ids_one, **media(ref, "one"), **audio)
    with pytest.raises(AudioError, match="no audio"):
        model.model(mx.array(ref["audio_input_ids"]))


def test_audio_on_a_model_without_an_audio_tower_is_a_typed_error(ref):
    config = gemma4_mm.ModelArgs.from_dict({**_config(), "audio_config": None})
    vision_only = gemma4_mm.Model(config)
    assert vision_only.audio_input is None and vision_only.image_input is not None
    with pytest.raises(AudioError, match="no audio tower"):
        vision_only.model(mx.array(ref["audio_input_ids"]), **media(ref, "audio"))


def _config() -> dict:
    import json

    return json.loads((FOLDER / "config.json").read_text())
