"""Gemma 3's pan & scan against transformers' Gemma3Processor (`do_pan_and_scan=True`) and the tiny
Gemma3ForConditionalGeneration, as recorded by tests/fixtures/make_gemma3_pan_and_scan.py: a wide
and a tall image at the processor's default settings, and two images (one cut into 3 crops, the last
narrower; one square, not cut) in one prompt with custom settings.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from test_gemma3_chat import GEMMA3_CHAT_TEMPLATE, MAX_TOKENS, _greedy

import mlx_gemma
from mlx_gemma.chat import ChatSession
from mlx_gemma.errors import ImageError
from mlx_gemma.generate import generate, main, stream_generate
from mlx_gemma.image_chat import chat_image_rows
from mlx_gemma.pan_and_scan import PanAndScan, crop_boxes, pan_and_scan_settings
from mlx_gemma.prompt_cache import PromptCache
from mlx_gemma.vision import prompt_inputs

CASES = {  # as the fixture script's: prompt, settings
    "wide": ("<start_of_image>Describe this.", True),
    "tall": ("What is in <start_of_image>?", True),
    "custom": ("Compare <start_of_image> and <start_of_image>.",
               PanAndScan(min_crop_size=20, max_num_crops=4, min_ratio_to_activate=1.2)),
}
RTOL = 1e-4  # of the reference logits' largest magnitude


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma3_vlm")
    return model, tokenizer, dict(np.load(FIXTURES / "gemma3_pan_and_scan.npz"))


def images_of(ref, case):
    return [ref[k] for k in sorted(k for k in ref if k.startswith(f"{case}_image"))]


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_and_pixels_equal_the_processor(loaded, case):
    model, tokenizer, ref = loaded
    prompt, settings = CASES[case]
    ids, pixels, padding = prompt_inputs(model, tokenizer, [prompt], [images_of(ref, case)], pan_and_scan=settings)
    assert np.array(ids).tolist() == ref[f"{case}_input_ids"].tolist() and np.array(padding).tolist() == [0]
    np.testing.assert_allclose(np.array(pixels), ref[f"{case}_pixel_values"].transpose(0, 2, 3, 1), atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_with_crops_equal_transformers(loaded, case):
    model, tokenizer, ref = loaded
    prompt, settings = CASES[case]
    ids, pixels, _ = prompt_inputs(model, tokenizer, [prompt], [images_of(ref, case)], pan_and_scan=settings)
    expected = ref[f"{case}_logits"]
    logits = np.array(model(ids, pixel_values=pixels)[:, -expected.shape[1]:])
    assert np.abs(logits - expected).max() / np.abs(expected).max() < RTOL


def test_off_by_default_and_the_crop_geometry():
    """Counts and boxes of Gemma3ImageProcessor.pan_and_scan for the recorded sizes (3, 2, 3 + 0 crops)."""
    default = PanAndScan()
    assert pan_and_scan_settings(None) is None and pan_and_scan_settings(False) is None
    assert pan_and_scan_settings(True) == default == PanAndScan(256, 4, 1.2)
    assert crop_boxes(900, 300, default) == [(0, 0, 300, 300), (300, 0, 600, 300), (600, 0, 900, 300)]
    assert crop_boxes(280, 700, default) == [(0, 0, 280, 350), (0, 350, 280, 700)]
    small = CASES["custom"][1]
    assert crop_boxes(100, 33, small) == [(0, 0, 34, 33), (34, 0, 68, 33), (68, 0, 100, 33)]
    assert crop_boxes(40, 40, small) == []
    assert crop_boxes(640, 240, default) == []  # 2 crops of 320 x 240: under the minimum size


def test_generate_takes_the_keyword(loaded):
    """Greedy decoding from the pan & scan prompt: the first token is the argmax of transformers' last logits."""
    model, tokenizer, ref = loaded
    prompt, _ = CASES["wide"]
    first = generate(model, tokenizer, prompt, image=images_of(ref, "wide"), max_tokens=1, chat=False,
                     pan_and_scan=True)
    assert first == tokenizer.decode([int(ref["wide_logits"][0, -1].argmax())])


def test_cli_flag(loaded, tmp_path, capsys):
    model, tokenizer, ref = loaded
    path = tmp_path / "wide.png"
    Image.fromarray(ref["wide_image0"]).save(path)  # lossless: the reference's pixels
    argv = ["--model", str(FIXTURES / "tiny_gemma3_vlm"), "-p", CASES["wide"][0], "--image", str(path),
            "--max-tokens", "1", "--no-chat", "--pan-and-scan"]
    assert main(argv) == 0
    assert capsys.readouterr().out == tokenizer.decode([int(ref["wide_logits"][0, -1].argmax())]) + "\n"


def reference():
    """torch, transformers' Gemma3Processor with Gemma 3's chat template, and its model (eager attention)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))
    from make_tiny_gemma3_vlm import processor

    proc = processor(FIXTURES / "tiny_gemma3_vlm")
    proc.chat_template = proc.tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(FIXTURES / "tiny_gemma3_vlm",
                                                                     attn_implementation="eager").eval()
    return torch, proc, hf


@pytest.mark.oracle
def test_chat_template_with_crops_equals_transformers(loaded):
    """Gemma 3's published chat template rendered by transformers' processor, then expanded with
    pan & scan: our chat rows (messages, and a string with chat=True) give its ids, pixels and logits."""
    torch, proc, hf = reference()
    model, tokenizer, ref = loaded
    images = [ref["custom_image0"], ref["tall_image0"]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}, {"type": "text", "text": "please."}]}]
    text = proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    settings = CASES["custom"][1]
    # add_special_tokens=False: the template writes <bos> (as the processor's own tokenize=True path does)
    batch = proc(images=[images], text=[text], return_tensors="pt", add_special_tokens=False, do_pan_and_scan=True,
                 pan_and_scan_min_crop_size=settings.min_crop_size, pan_and_scan_max_num_crops=settings.max_num_crops,
                 pan_and_scan_min_ratio_to_activate=settings.min_ratio_to_activate)
    with torch.no_grad():
        expected = hf(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids",
                                               "pixel_values")}).logits[0].numpy()
    for prompt, chat in ((messages, None), ("<start_of_image>Compare<start_of_image>please.", True)):
        rows, pixels = chat_image_rows(model, tokenizer, [prompt], [images], chat, None, settings)
        assert rows[0] == batch["input_ids"][0].tolist()
        np.testing.assert_allclose(np.array(pixels), batch["pixel_values"].numpy().transpose(0, 2, 3, 1), atol=1e-6)
    logits = np.array(model(mx.array(rows), pixel_values=pixels)[0])
    assert np.abs(logits - expected).max() / np.abs(expected).max() < RTOL


def test_prompt_cache_with_crops_equals_no_cache(loaded):
    """A prompt cache with pan & scan: each crop is an image block of its own, so the cache keeps
    the image and its crops; the tokens equal an uncached run (checked against transformers above),
    and a second question about the same image feeds only the new text."""
    model, tokenizer, ref = loaded
    images, settings = images_of(ref, "custom"), CASES["custom"][1]
    prompt = CASES["custom"][0]
    plain = [r.token for r in stream_generate(model, tokenizer, prompt, image=images, max_tokens=4, chat=True,
                                              pan_and_scan=settings)]
    cache = PromptCache(model)
    cached = [r.token for r in stream_generate(model, tokenizer, prompt, image=images, max_tokens=4, chat=True,
                                               pan_and_scan=settings, prompt_cache=cache)]
    assert cached == plain
    n_blocks = len(images) + 3  # the first image is cut into 3 crops (the fixture's recorded count)
    assert len(cache.images) == n_blocks
    rows, pixels = chat_image_rows(model, tokenizer, [prompt], [images], True, None, settings)
    assert pixels.shape[0] == n_blocks and cache.tokens[: len(rows[0])] == rows[0]
    # The same prompt again: the cached image blocks are kept, only the last prompt token is fed.
    again = [r.token for r in stream_generate(model, tokenizer, prompt, image=images, max_tokens=4, chat=True,
                                              pan_and_scan=settings, prompt_cache=cache)]
    assert again == plain


@pytest.mark.oracle
def test_chat_session_with_crops_equals_transformers(loaded):
    """`ChatSession(pan_and_scan=...)`: a turn with a wide image (cut into crops), then a turn with a
    square one; each turn's ids and greedy tokens are transformers' for the whole conversation,
    expanded by its processor with `do_pan_and_scan`."""
    torch, proc, hf = reference()
    model, tok, ref = loaded
    settings = CASES["custom"][1]
    options = dict(return_tensors="pt", add_special_tokens=False, do_pan_and_scan=True,
                   pan_and_scan_min_crop_size=settings.min_crop_size,
                   pan_and_scan_max_num_crops=settings.max_num_crops,
                   pan_and_scan_min_ratio_to_activate=settings.min_ratio_to_activate)
    wide, square = (Image.fromarray(im) for im in images_of(ref, "custom"))
    eot = tok.end_of_turn_id

    session = ChatSession(model, tok, max_tokens=MAX_TOKENS, pan_and_scan=settings)
    first = [r.token for r in session.send("Compare", [wide])]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}]}]
    text1 = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch1 = proc(text=[text1], images=[[wide]], **options)
    turn1 = batch1["input_ids"][0].tolist()
    assert session.history[: len(turn1)] == turn1
    assert len(session.images) == 1 + 3  # the wide image and its 3 crops
    inputs = {k: batch1[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    assert first == _greedy(torch, hf, inputs, eot)

    reply = tok.decode([t for t in first if t != eot])
    messages += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    text2 = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text2.startswith(text1 + reply)
    rest = proc(text=[text2[len(text1) + len(reply):]], images=[[square]], **options)
    ids = turn1 + [t for t in first if t != eot] + rest["input_ids"][0].tolist()
    second = [r.token for r in session.send("And this?", [square])]
    assert session.history[: len(ids)] == ids
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": (input_ids == 401).long(),
              "pixel_values": torch.cat([batch1["pixel_values"], rest["pixel_values"]])}
    assert second == _greedy(torch, hf, inputs, eot)


def test_bad_settings_and_models(loaded):
    model, tokenizer, ref = loaded
    ids = [2, 7] + [401] * 4 + [400]
    with pytest.raises(ImageError, match="token ids come as given"):
        chat_image_rows(model, tokenizer, [ids], [ref["wide_image0"]], None, None, True)
    for bad in ({"min_crop_size": 0}, {"max_num_crops": 1.5}, {"min_ratio_to_activate": 0.5}, {"crops": 2}, "yes"):
        with pytest.raises(ImageError, match="pan_and_scan"):
            pan_and_scan_settings(bad)
    pali, pali_tokenizer = mlx_gemma.load(FIXTURES / "tiny_paligemma")
    with pytest.raises(ImageError, match="pan & scan is Gemma 3's"):
        prompt_inputs(pali, pali_tokenizer, ["caption en"], [ref["wide_image0"]], pan_and_scan=True)
    ids, pixels, _ = prompt_inputs(model, tokenizer, [CASES["wide"][0]], [images_of(ref, "wide")])
    assert pixels.shape[0] == 1 and int(mx.sum(ids == 401).item()) == 4  # off: the image alone
