"""keras-hub style Gemma3CausalLM with images, on the tiny Gemma 3 vision-language fixture.

Expected ids and greedy tokens are transformers 5.25's (tests/fixtures/make_tiny_gemma3_vlm.py:
Gemma3Processor's ids and pixels, Gemma3ForConditionalGeneration's greedy generate); keras-hub
0.32's Gemma3CausalLMPreprocessor lays a prompt out the same way (each `<start_of_image>` ->
"\\n\\n<start_of_image>", the placeholders, "<end_of_image>\\n\\n"), but packs it right-padded.
keras-hub's own preprocessor needs TensorFlow, which the test environment does not have.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES

from mlx_gemma.errors import ImageError, MlxGemmaError
from mlx_gemma.tasks.causal_lm import GemmaCausalLM
from mlx_gemma.tasks.gemma3_causal_lm import Gemma3CausalLM

FOLDER = FIXTURES / "tiny_gemma3_vlm"
PROMPTS = {  # as the fixture script's
    "one": ["<start_of_image>What is in this image?"],
    "two": ["Compare <start_of_image> with <start_of_image> and say which is brighter."],
    "batch": ["<start_of_image>caption", "Describe <start_of_image> in a few words, please."],
}
GREEDY = 8


@pytest.fixture(scope="module")
def setup():
    ref = dict(np.load(FOLDER / "reference.npz"))
    return Gemma3CausalLM.from_preset(FOLDER, sequence_length=96), Gemma3CausalLM.from_preset(
        FOLDER, preprocessor=None), ref


def images_of(ref, case):
    return {"one": [ref["image0"]], "two": [[ref["image1"], ref["image2"]]],
            "batch": [ref["image0"], [ref["image1"]]]}[case]


def real_rows(ref, case) -> list[list[int]]:
    """The processor's ids per row without its left padding."""
    ids, mask = ref[f"{case}_input_ids"], ref[f"{case}_attention_mask"].astype(bool)
    return [row[m].tolist() for row, m in zip(ids, mask)]


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_layout_and_pixels_equal_the_processor(setup, case):
    lm, _, ref = setup
    packed = lm.preprocessor.generate_preprocess({"prompts": PROMPTS[case], "images": images_of(ref, case)})
    pixels = ref[f"{case}_pixel_values"].transpose(0, 2, 3, 1)
    k = 0
    for b, row in enumerate(real_rows(ref, case)):
        assert packed["token_ids"][b, :len(row)].tolist() == row
        assert packed["padding_mask"][b].sum() == len(row)  # right-padded after the prompt
        n = row.count(lm.vlm.image_input.start_id)
        np.testing.assert_allclose(packed["images"][b, :n], pixels[k:k + n], atol=1e-6)
        assert not packed["images"][b, n:].any()  # keras-hub pads to max_images_per_prompt with zeros
        k += n


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_generate_equals_transformers_greedy(setup, case):
    """Packed by the preprocessor, generated with preprocessor=None (keras-hub's dict form):
    each row's first new tokens are transformers' greedy tokens."""
    lm, bare, ref = setup
    rows = real_rows(ref, case)
    max_length = max(len(r) for r in rows) + GREEDY
    packed = lm.preprocessor.generate_preprocess({"prompts": PROMPTS[case], "images": images_of(ref, case)},
                                                 sequence_length=max_length)
    out = bare.generate(packed, stop_token_ids=None)
    assert np.array_equal(out["images"], packed["images"])
    for b, row in enumerate(rows):
        assert out["token_ids"][b, len(row):len(row) + GREEDY].tolist() == ref[f"{case}_greedy"][b].tolist()
        assert out["token_ids"][b, :len(row)].tolist() == row and out["padding_mask"][b].all()


def test_single_prompt_strings_and_postprocess(setup):
    """One prompt string gives one string: keras-hub's generate_postprocess of the generated ids
    (special tokens dropped, `<start_of_image>` kept)."""
    lm, bare, ref = setup
    row = real_rows(ref, "one")[0]
    inputs = {"prompts": PROMPTS["one"][0], "images": ref["image0"]}
    text = lm.generate(inputs, max_length=len(row) + GREEDY, stop_token_ids=None)
    ids = row + ref["one_greedy"][0].tolist()
    spec, tok = lm.vlm.image_input, lm.preprocessor.tokenizer
    expected = tok.detokenize([i for i in ids if i not in (spec.token_id, spec.end_id, *tok.special_token_ids)])
    assert isinstance(text, str) and text == expected and text.startswith("\n\n<start_of_image>\n\nWhat is")
    single = bare.generate({k: v for k, v in lm.preprocessor.generate_preprocess(
        inputs, sequence_length=len(row) + GREEDY).items()}, stop_token_ids=None)
    assert single["token_ids"].ndim == 1 and single["token_ids"][len(row):].tolist() == ref["one_greedy"][0].tolist()


def test_text_prompts_and_the_text_task(setup):
    """Strings without images: transformers' text-only greedy tokens; GemmaCausalLM of the
    same folder keeps working (its language half)."""
    lm, bare, ref = setup
    ids = ref["text_input_ids"][0].tolist()
    length = len(ids) + GREEDY
    mask = np.arange(length) < len(ids)
    token_ids = np.where(mask, np.pad(ids, (0, GREEDY)), 0)
    out = bare.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][len(ids):].tolist() == ref["text_greedy"][0].tolist()
    text_lm = GemmaCausalLM.from_preset(FOLDER, preprocessor=None)
    again = text_lm.generate({"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None)
    assert np.array_equal(again["token_ids"], out["token_ids"])
    prompt = PROMPTS["one"][0].replace("<start_of_image>", "")
    assert lm.generate({"prompts": prompt}, max_length=length) == lm.generate(prompt, max_length=length)


def test_bad_image_inputs(setup):
    lm, bare, ref = setup
    with pytest.raises(ImageError, match="2 <start_of_image> markers for 1 image"):
        lm.generate({"prompts": PROMPTS["two"][0], "images": ref["image0"]})
    with pytest.raises(ImageError, match="0 <start_of_image> markers for 1 image"):
        lm.generate({"prompts": "no marker", "images": ref["image0"]})
    with pytest.raises(ImageError, match="max_images_per_prompt is 2"):
        lm.generate({"prompts": "<start_of_image>" * 3, "images": [ref["image0"]] * 3})
    with pytest.raises(ImageError, match="cuts an image"):
        lm.generate({"prompts": PROMPTS["one"][0], "images": ref["image0"]}, max_length=5)
    packed = lm.preprocessor.generate_preprocess({"prompts": PROMPTS["two"], "images": images_of(ref, "two")})
    with pytest.raises(ImageError, match="holds 2 images' tokens but 1 images"):
        bare.generate({**packed, "images": packed["images"][:, :1]}, stop_token_ids=None)
    with pytest.raises(MlxGemmaError, match="sequence_length must be greater"):
        Gemma3CausalLM.from_preset(FOLDER, sequence_length=8)


@pytest.mark.parametrize("preset,repo", [("gemma3_instruct_4b", "google/gemma-3-4b-it"),
                                         ("gemma3_27b", "google/gemma-3-27b-pt")])
def test_vision_presets_name_their_hf_repos(preset, repo, monkeypatch):
    """keras-hub's Gemma 3 presets with a vision encoder resolve to the multimodal HF checkpoints
    (offline here: the typed error names the repository it would read)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MlxGemmaError, match=repo):
        Gemma3CausalLM.from_preset(preset)
