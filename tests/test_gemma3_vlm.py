"""Gemma 3 with images against transformers' Gemma3ForConditionalGeneration and Gemma3Processor.

The references come from tests/fixtures/make_tiny_gemma3_vlm.py (transformers 5.25, fp32,
eager): a SigLIP of 2 layers at 56 px pooled to 4 soft tokens, a 4-layer Gemma 3 whose
sliding window (6) is shorter than every prompt; logits for one image, two images in one
prompt, a left-padded batch of two prompts with different images, a text-only prompt and a
window (3) shorter than an image block; greedy tokens of transformers' generate.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from safetensors.numpy import load_file, save_file

import mlx_gemma
from mlx_gemma.engine import prefill
from mlx_gemma.errors import ConfigError, ImageError
from mlx_gemma.generate import generate, generate_step, main, stream_batch_generate
from mlx_gemma.loading import load_model, load_model_from
from mlx_gemma.models.image_blocks import chunk_ends
from mlx_gemma.vision import prompt_inputs

FOLDER = FIXTURES / "tiny_gemma3_vlm"
RTOL = 1e-4  # of the reference logits' largest magnitude
IMAGE_TOKEN = 401
PROMPTS = {  # as the fixture script's
    "one": ["<start_of_image>What is in this image?"],
    "two": ["Compare <start_of_image> with <start_of_image> and say which is brighter."],
    "batch": ["<start_of_image>caption", "Describe <start_of_image> in a few words, please."],
}


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = mlx_gemma.load(FOLDER)
    return model, tokenizer, dict(np.load(FOLDER / "reference.npz"))


def images_of(ref, case):
    """Each case's images, one entry per prompt (a list for several in one prompt)."""
    return {"one": [ref["image0"]], "two": [[ref["image1"], ref["image2"]]],
            "batch": [ref["image0"], ref["image1"]]}[case]


def nhwc(pixel_values_nchw: np.ndarray) -> mx.array:
    return mx.array(pixel_values_nchw.transpose(0, 2, 3, 1))


def rel_err(ours, ref, where=None) -> float:
    d = np.abs(np.array(ours, dtype=np.float32) - ref)
    return float((d if where is None else d[where]).max() / np.abs(ref).max())


def case_inputs(ref, case):
    real = ref[f"{case}_attention_mask"].astype(bool)
    return mx.array(ref[f"{case}_input_ids"]), nhwc(ref[f"{case}_pixel_values"]), real


def test_architecture(loaded):
    model, _, _ = loaded
    assert model.model_type == "gemma3" and model.args.text.model_type == "gemma3_text"
    assert model.windows == [6, 6, None, 6]
    spec = model.image_input
    assert (spec.image_size, spec.num_tokens, spec.token_id, spec.start_id, spec.end_id) == (56, 4, 401, 7, 400)
    assert not model.prefix_lm and model.args.tie_word_embeddings


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_logits_match_transformers(loaded, case):
    model, _, ref = loaded
    ids, pixels, real = case_inputs(ref, case)
    logits = model(ids, pixel_values=pixels, padding_mask=mx.array(real))
    # Padding positions are garbage in both implementations; real tokens must agree.
    assert rel_err(logits, ref[f"{case}_logits"], real) < RTOL


@pytest.mark.parametrize("case", ["one", "two", "batch"])
def test_prompt_layout_and_pixels_equal_the_processor(loaded, case):
    model, tokenizer, ref = loaded
    ids, pixels, padding = prompt_inputs(model, tokenizer, PROMPTS[case], images_of(ref, case))
    real = ref[f"{case}_attention_mask"].astype(bool)
    assert np.array_equal(np.array(ids)[real], ref[f"{case}_input_ids"][real])
    assert np.array(padding).tolist() == (~real).sum(axis=1).tolist()
    np.testing.assert_allclose(np.array(pixels), ref[f"{case}_pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)


def test_bidirectional_mask_matters(loaded):
    """The image blocks change the logits (else the parity above would not test them)."""
    model, _, ref = loaded
    ids, pixels, _ = case_inputs(ref, "two")
    h = model.model.embed(ids, pixels)
    causal = model.logits(model.decoder(None, input_embeddings=h))
    assert rel_err(causal, ref["two_logits"]) > 100 * RTOL


def test_window_shorter_than_an_image_block():
    """Window 3 < 4 soft tokens: transformers 5.25 keeps key > query - window inside a block."""
    config = json.loads((FOLDER / "config.json").read_text())
    config["text_config"]["sliding_window"] = 3
    model = load_model_from(config, dict(mx.load(str(FOLDER / "model.safetensors"))), path=FOLDER)
    ref = dict(np.load(FOLDER / "reference.npz"))
    ids, pixels, _ = case_inputs(ref, "one")
    assert rel_err(model(ids, pixel_values=pixels), ref["window3_logits"]) < RTOL
    for step in (2, 5):  # a window boundary inside the image, chunk boundaries moved past it
        cache = model.make_cache()
        hidden = prefill(model, ids, cache, step, keep_hidden=True, pixel_values=pixels)
        assert rel_err(model.logits(hidden), ref["window3_logits"]) < RTOL


@pytest.mark.parametrize("case,step", [("two", 4), ("two", 6), ("batch", 3), ("batch", 5)])
def test_chunked_prefill_and_decoding_equal_a_full_call(loaded, case, step):
    """Chunks of `step` that would cut an image are moved past it; prefill, then decoding the
    reference's greedy tokens one by one, gives the full call's logits at every position."""
    model, _, ref = loaded
    ids, pixels, real = case_inputs(ref, case)
    plain = list(range(step, ids.shape[1], step))
    assert chunk_ends(ids, step, IMAGE_TOKEN) != plain + [ids.shape[1]]  # some boundary fell inside an image
    pad = mx.array((~real).sum(axis=1).astype(np.int32))
    cache = model.make_cache(left_padding=pad if case == "batch" else None)
    hidden = prefill(model, ids, cache, step, keep_hidden=True, pixel_values=pixels)
    logits = [model.logits(hidden)]
    for token in ref[f"{case}_greedy"].T[:-1]:
        logits.append(model(mx.array(token[:, None].astype(np.int32)), cache=cache))
    full_ids = mx.concatenate([ids, mx.array(ref[f"{case}_greedy"][:, :-1].astype(np.int32))], axis=1)
    full_real = np.concatenate([real, np.ones(ref[f"{case}_greedy"][:, :-1].shape, bool)], axis=1)
    full = model(full_ids, pixel_values=pixels, padding_mask=mx.array(full_real))
    assert rel_err(mx.concatenate(logits, axis=1), np.array(full), full_real) < RTOL
    assert rel_err(logits[0], ref[f"{case}_logits"], real) < RTOL


@pytest.mark.parametrize("case", ["one", "two"])
def test_greedy_tokens_equal_transformers(loaded, case):
    model, tokenizer, ref = loaded
    ids, pixels, _ = case_inputs(ref, case)
    for step_size in (None, 3):  # the device's default chunks and chunks that would cut the images
        tokens = [t[0] for t, _ in generate_step(model, ids, max_tokens=8, pixel_values=pixels,
                                                 prefill_step_size=step_size)]
        assert tokens == ref[f"{case}_greedy"][0].tolist()


def test_batch_greedy_tokens_equal_transformers(loaded):
    model, tokenizer, ref = loaded
    rows = [[], []]
    for step in stream_batch_generate(model, tokenizer, PROMPTS["batch"], max_tokens=8,
                                      image=images_of(ref, "batch"), stop_token_ids=[]):
        for b, r in enumerate(step):
            if r is not None:
                rows[b].append(r.token)
    assert rows == ref["batch_greedy"].tolist()  # the first row is left-padded


def test_text_prompts_on_the_multimodal_model(loaded):
    """A vision-language folder also serves text: no images, plain Gemma 3."""
    model, tokenizer, ref = loaded
    ids = ref["text_input_ids"]
    assert tokenizer.encode("What is in this image?") == ids[0].tolist()
    assert rel_err(model(mx.array(ids)), ref["text_logits"]) < RTOL
    tokens = [r.token for r in mlx_gemma.stream_generate(model, tokenizer, "What is in this image?", max_tokens=8,
                                                         stop_token_ids=[], chat=False)]
    assert tokens == ref["text_greedy"][0].tolist()


def _rewrite_layout(tmp_path, rename, conv_ohwi=False):
    folder = tmp_path / "layout"
    shutil.copytree(FOLDER, folder)
    weights = {}
    for k, v in load_file(FOLDER / "model.safetensors").items():
        if conv_ohwi and k.endswith("patch_embedding.weight"):
            v = np.ascontiguousarray(v.transpose(0, 2, 3, 1))  # MLX's conv layout, as mlx-vlm saves it
        weights[rename(k)] = v
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _transformers_names(k: str) -> str:
    """transformers 5's module names: model.language_model.*, model.vision_tower.vision_model.*, ..."""
    for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower.vision_model."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


def _mlx_vlm_names(k: str) -> str:
    """mlx-vlm's Gemma 3: language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*."""
    return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k


@pytest.mark.parametrize("rename,ohwi", [(_transformers_names, False), (_mlx_vlm_names, True)])
def test_weight_layouts_load_alike(loaded, tmp_path, rename, ohwi):
    model, _, ref = loaded
    assert any(k.startswith("language_model.model.") for k in load_file(FOLDER / "model.safetensors"))
    other = load_model(_rewrite_layout(tmp_path, rename, ohwi))
    ids, pixels, _ = case_inputs(ref, "one")
    assert mx.array_equal(other(ids, pixel_values=pixels), model(ids, pixel_values=pixels)).item()


def test_cli_takes_every_image_into_one_prompt(loaded, tmp_path, capsys):
    model, tokenizer, ref = loaded
    paths = []
    for i in (1, 2):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(ref[f"image{i}"]).save(paths[-1])  # lossless: the reference's pixels
    expected = tokenizer.decode(ref["two_greedy"][0].tolist())
    argv = ["--model", str(FOLDER), "-p", PROMPTS["two"][0], "--max-tokens", "8", "--no-chat"]
    assert main(argv + ["--image", str(paths[0]), "--image", str(paths[1])]) == 0
    assert capsys.readouterr().out == expected + "\n"


# ----- bad input ---------------------------------------------------------------------------


def test_image_count_must_match_the_image_tokens(loaded):
    model, tokenizer, ref = loaded
    ids, pixels, _ = case_inputs(ref, "two")
    with pytest.raises(ImageError, match="1 image\\(s\\) need 4 <image_soft_token> tokens.*hold 8"):
        model(ids, pixel_values=pixels[:1])
    with pytest.raises(ImageError, match="8 <image_soft_token> tokens but no images"):
        model(ids)
    with pytest.raises(ImageError, match="2 <start_of_image> markers for 1 image"):
        generate(model, tokenizer, PROMPTS["two"][0], image=ref["image1"], max_tokens=2)
    with pytest.raises(ImageError, match="1 <start_of_image> markers for 2 image"):
        generate(model, tokenizer, PROMPTS["one"][0], image=[ref["image1"], ref["image2"]], max_tokens=2)


def test_an_image_on_a_text_only_model(loaded):
    _, _, ref = loaded
    text_model, text_tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma3")
    with pytest.raises(ImageError, match="takes no images"):
        generate(text_model, text_tokenizer, "Describe", image=ref["image0"], max_tokens=2)


def test_corrupt_images(loaded, tmp_path):
    model, tokenizer, ref = loaded
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    with pytest.raises(ImageError, match="bad.png"):
        generate(model, tokenizer, PROMPTS["one"][0], image=bad, max_tokens=2)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(ref["image2"]).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(ImageError, match="truncated.png"):
        generate(model, tokenizer, PROMPTS["one"][0], image=truncated, max_tokens=2)


@pytest.mark.parametrize("change,message", [
    ({"mm_tokens_per_image": 3}, "mm_tokens_per_image must be a square"),
    ({"mm_tokens_per_image": 9}, "whose side divides the patch grid"),
    ({"image_token_index": -1}, "image_token_index must be a non-negative integer"),
    ({"vision_config": "siglip"}, "needs text_config and vision_config objects; vision_config is a string"),
    ({"vision_config": {"image_size": 50}}, "image_size 50 is not a multiple of patch_size 14"),
])
def test_bad_configs_are_refused(change, message):
    config = {**json.loads((FOLDER / "config.json").read_text()), **change}
    with pytest.raises(ConfigError, match=message):
        load_model_from(config, {}, path=FOLDER)


# ----- conversion ---------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [False, True])
def test_convert_keeps_the_vision_model(loaded, tmp_path, quantize):
    """A converted folder is still the vision-language model; quantizing leaves the SigLIP tower
    and the projector in float (Model.float_prefixes) and quantizes the language model."""
    from mlx.utils import tree_flatten

    from mlx_gemma.convert import convert

    _, _, ref = loaded
    dest = convert(FOLDER, mlx_path=tmp_path / "out", quantize=quantize, q_bits=8, q_group_size=32, progress=False)
    config = json.loads((dest / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["vision_config"]["image_size"] == 56
    model = load_model(dest)
    names = dict(tree_flatten(model.parameters()))
    assert not any(k.startswith(model.float_prefixes) and k.endswith(".scales") for k in names)
    assert any(k.endswith(".scales") for k in names) == quantize
    ids, pixels, real = case_inputs(ref, "batch")
    logits = model(ids, pixel_values=pixels, padding_mask=mx.array(real))
    # 8-bit weights in the language model: 3.5e-2 of the logits' scale measured on this random model.
    assert rel_err(logits, ref["batch_logits"], real) < (5e-2 if quantize else RTOL)


def test_keras_style_tasks_take_the_language_half(loaded):
    """GemmaCausalLM / GemmaBackbone of a multimodal Gemma 3 folder (keras-hub's gemma3_4b_text
    presets map to those repositories) run its text model, sharing the weights."""
    from mlx_gemma.tasks import GemmaBackbone, GemmaCausalLM

    model, _, ref = loaded
    backbone = GemmaBackbone.from_model(model)
    assert backbone.model.model_type == "gemma3_text" and backbone.model.decoder is model.decoder
    hidden = backbone({"token_ids": ref["text_input_ids"]})
    assert rel_err(model.logits(hidden), ref["text_logits"]) < RTOL
    lm = GemmaCausalLM.from_preset(FOLDER)
    assert rel_err(lm.backbone.model(mx.array(ref["text_input_ids"])), ref["text_logits"]) < RTOL


# ----- live oracle: transformers on fresh inputs ----------------------------------------------


@pytest.mark.oracle
def test_live_transformers_parity_on_fresh_inputs(loaded):
    """Fresh images and prompts (three images over a padded batch of two, special tokens in the
    text): the processor's ids and pixels, and the model's logits, full and chunked."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, str(FIXTURES))
    from make_tiny_gemma3_vlm import processor

    model, tokenizer, _ = loaded
    rng = np.random.default_rng(77)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((20, 90, 3), (70, 45, 3), (56, 57, 3))]
    prompts = ["<start_of_image><start_of_image>Which one is brighter?",
               "<start_of_turn>user\n<start_of_image>Describe it.<end_of_turn>\n<start_of_turn>model\n"]
    batch = processor(FOLDER)(images=[images[:2], images[2:]], text=prompts, return_tensors="pt", padding="longest")
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(FOLDER, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids",
                                                      "pixel_values")}).logits.numpy()
    real = batch["attention_mask"].numpy().astype(bool)
    ids, pixels, padding = prompt_inputs(model, tokenizer, prompts, [images[:2], images[2:]])
    assert np.array_equal(np.array(ids)[real], batch["input_ids"].numpy()[real])
    np.testing.assert_allclose(np.array(pixels), batch["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-6)
    assert rel_err(model(ids, pixel_values=pixels, padding_mask=mx.array(real)), expected, real) < RTOL
    cache = model.make_cache(left_padding=padding)
    hidden = prefill(model, ids, cache, 5, keep_hidden=True, pixel_values=pixels)
    assert rel_err(model.logits(hidden), expected, real) < RTOL
