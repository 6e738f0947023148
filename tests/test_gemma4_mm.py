"""Gemma 4 with images and audio (models/gemma4_mm.py, mlx_gemma/gemma4_prompts.py, generate's media paths)
against transformers 5.25's Gemma4ForConditionalGeneration and Gemma4Processor.

The fixture (tests/fixtures/make_tiny_gemma4_mm.py) holds a tiny random model with both towers and,
per case, the processor's ids and media inputs, transformers' normed last hidden states at every
position and its logits at every 10th position and the last.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import mlx.core as mx
from PIL import Image

from mlx_gemma.api import load
from mlx_gemma.engine import prefill
from mlx_gemma.errors import AudioError, GenerationError, ImageError
from mlx_gemma.gemma4_prompts import media_rows
from mlx_gemma.generate import batch_generate, generate_step, main, stream_generate
from mlx_gemma.loading import load_model
from mlx_gemma.models import gemma4_mm
from mlx_gemma.prompt_cache import PromptCache

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
    return json.loads((FOLDER / "config.json").read_text())


# ----- prompts and generation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return load(str(FOLDER))


def tone(ref) -> np.ndarray:
    return ref["pcm"].astype(np.float32) / 32768.0


def greedy(model, ids, media=None, step=None, n=8) -> list[int]:
    steps = generate_step(model, mx.array(ids), max_tokens=n, prefill_step_size=step, media=media)
    return [tokens[0] for tokens, _ in steps]


def test_audio_prompt_ids_and_features_equal_the_processor(loaded, ref):
    """A plain prompt with a clip: ids equal Gemma4Processor's; features within 1e-5 of its extractor's."""
    model, tok = loaded
    rows, media = media_rows(model, tok, ["<|audio|> Transcribe this."], [None], [tone(ref)])
    assert rows[0] == ref["audio_input_ids"][0].tolist()
    assert np.abs(np.array(media.audio_features) - ref["audio_input_features"]).max() < 1e-5
    assert np.array_equal(np.array(media.audio_mask), ref["audio_input_features_mask"])


@pytest.mark.parametrize("case,step", [("one", None), ("audio", None), ("both", None), ("both", 5)])
def test_greedy_tokens_equal_transformers(model, ref, case, step):
    """Our engine (chunked prefill of 5 positions too: images stay whole) gives transformers' greedy tokens."""
    assert greedy(model, ref[f"{case}_input_ids"], media(ref, case), step) == ref[f"{case}_greedy"].tolist()


def test_stream_generate_with_audio_equals_transformers(loaded, ref):
    model, tok = loaded
    tokens = [r.token for r in stream_generate(model, tok, "<|audio|> Transcribe this.", audio=tone(ref), max_tokens=8)]
    assert tokens == ref["audio_greedy"].tolist()


def test_cached_decoding_equals_a_full_call(model, ref):
    """Prefill in chunks into a cache, then feed transformers' greedy tokens one at a time: each
    step's logits equal one full call's over the whole sequence (image, audio, window wrap)."""
    ids = np.concatenate([ref["both_input_ids"][0], ref["both_greedy"]])[None]
    inputs = media(ref, "both")
    full = model(mx.array(ids), **inputs)  # [1, T + 8, V]
    T = ref["both_input_ids"].shape[1]
    cache = model.make_cache()
    hidden = prefill(model, mx.array(ids[:, :T]), cache, 6, **inputs)
    steps = [model.logits(hidden[:, -1])]
    for t in range(T, ids.shape[1] - 1):
        steps.append(model(mx.array(ids[:, t:t + 1]), cache=cache)[:, -1])
    ours = mx.stack(steps, axis=1)
    assert rel(ours, np.array(full[:, T - 1:-1])) < 1e-5


def test_batch_generate_rows_equal_each_prompt_alone(loaded, ref):
    """A left-padded batch of two audio prompts gives what each gives alone (greedy)."""
    model, tok = loaded
    clip = tone(ref)
    prompts = ["<|audio|> Transcribe this.", "Say what <|audio|> sounds like, in a few words please."]
    together = batch_generate(model, tok, prompts, max_tokens=5, audio=[clip, clip[:8000]])
    alone = [batch_generate(model, tok, [p], max_tokens=5, audio=[c])[0] for p, c in zip(prompts, [clip, clip[:8000]])]
    assert together == alone


def test_prompt_cache_reuses_a_clip_only_if_it_is_the_same(loaded, ref):
    """A turn that continues what the cache holds feeds only its new tokens while the clip is the
    same (no tower run); another clip behind the same ids is fed again; each reply equals a fresh run's."""
    model, tok = loaded
    clip, other = tone(ref), -tone(ref)[::-1].copy()
    chat = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is it?"}]}]
    cache = PromptCache(model)
    first = list(stream_generate(model, tok, chat, audio=clip, max_tokens=3, prompt_cache=cache))
    follow = cache.tokens + tok.encode(" Louder?", add_bos=False)  # the cached ids (media blocks in them), then more
    second = list(stream_generate(model, tok, follow, audio=clip, max_tokens=3, prompt_cache=cache))
    fresh = list(stream_generate(model, tok, follow, audio=clip, max_tokens=3))
    assert [r.token for r in second] == [r.token for r in fresh]
    assert second[0].prompt_tokens <= len(follow) - first[0].prompt_tokens  # the first prompt and its clip held
    again = list(stream_generate(model, tok, follow, audio=other, max_tokens=3, prompt_cache=cache))
    assert again[0].prompt_tokens == len(follow)  # the clip differs: the prompt is fed again, clip and all
    assert [r.token for r in again] == [r.token for r in stream_generate(model, tok, follow, audio=other, max_tokens=3)]


def test_generate_refuses_media_the_model_cannot_take(loaded, ref):
    model, tok = loaded
    text_model, text_tok = load(str(FIXTURES / "tiny_gemma4_e2b"))
    with pytest.raises(AudioError, match="no audio tower"):
        list(stream_generate(text_model, text_tok, "Hi <|audio|>", audio=tone(ref), max_tokens=1))
    with pytest.raises(ImageError, match="takes no images"):
        list(stream_generate(text_model, text_tok, "Hi", image=np.zeros((8, 8, 3), np.uint8), max_tokens=1))
    clip = tone(ref)
    with pytest.raises(AudioError, match="1 <\\|audio\\|> markers for 2"):  # more media than placeholders
        list(stream_generate(model, tok, "<|audio|> twice?", audio=[clip, clip], max_tokens=1))
    with pytest.raises(AudioError, match="2 <\\|audio\\|> markers for 1"):  # fewer
        list(stream_generate(model, tok, "<|audio|> and <|audio|>", audio=clip, max_tokens=1))
    with pytest.raises(AudioError, match="1 audio parts for 2"):
        list(stream_generate(model, tok, [{"role": "user", "content": [{"type": "audio"}]}], audio=[clip, clip],
                             max_tokens=1))
    with pytest.raises(GenerationError, match="chat template"):
        list(stream_generate(model, tok, "Hi", enable_thinking=True, chat=False, max_tokens=1))


def test_cli_takes_an_image_and_a_clip(tmp_path, ref, capsys):
    soundfile = pytest.importorskip("soundfile")  # optional: soundfile reads the clip

    wav, png = tmp_path / "tone.wav", tmp_path / "look.png"
    soundfile.write(wav, ref["pcm"], 16_000, subtype="PCM_16")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(png)
    argv = ["--model", str(FOLDER), "--image", str(png), "--audio", str(wav), "--prompt", "<|image|> and <|audio|>?",
            "--max-tokens", "3", "--no-chat"]
    assert main(argv) == 0
    assert main(argv[:-1] + ["--chat", "--enable-thinking"]) == 0
    assert main(["--model", str(FIXTURES / "tiny_gemma4_e2b"), "--audio", str(wav), "--max-tokens", "1"]) == 2
    assert "no audio tower" in capsys.readouterr().err


@pytest.mark.oracle
def test_prompts_equal_gemma4_processor(loaded, ref):
    """Plain prompts with one and several images, a padded batch, an image with a clip, and the chat
    template with image and audio parts: our ids equal Gemma4Processor's, row by row (padding aside),
    and so do the patches and their positions."""
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_gemma4_mm as fixture  # deferred: imports torch and transformers (the live oracle)

    model, tok = loaded
    proc = fixture.processor()
    cases = fixture.cases(ref["pcm"])
    for name, case in cases.items():
        theirs = proc(text=case["text"], images=case.get("images"), audio=case.get("audio"), return_tensors="np",
                      padding=True, add_special_tokens=name != "chat")
        n = len(case["text"])
        images, clips = case.get("images") or [None] * n, case.get("audio") or [None] * n
        prompts = case["text"]
        if name == "chat":  # from the messages themselves, through our template
            prompts = [[{"role": "system", "content": "Look and listen."},
                        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                     {"type": "audio"}, {"type": "text", "text": "What is it?"}]}]]
        rows, media = media_rows(model, tok, prompts, images, clips)
        for row, ids, mask in zip(rows, theirs["input_ids"], theirs["attention_mask"]):
            assert row == ids[mask.astype(bool)].tolist(), name
        if "pixel_values" in theirs:
            assert np.abs(np.array(media.pixel_values) - theirs["pixel_values"]).max() < 1e-6
            assert np.array_equal(np.array(media.image_positions), theirs["image_position_ids"])


def test_sanitize_reads_mlx_vlm_names(model, ref):
    """mlx-vlm 0.7.10's names (no `model.` prefix, `language_model.model.*`, conv kernels already
    channels-last) and Hugging Face's map to ours; loaded that way, the logits are the same."""
    hf = dict(mx.load(str(FOLDER / "model.safetensors")))
    ours = model.sanitize(hf)
    vlm = {}
    for key, value in ours.items():
        name = key.removeprefix("model.")
        vlm["language_model.model." + name[len("language_model."):] if name.startswith("language_model.") else name] = value
    again = model.sanitize(vlm)
    assert set(again) == set(ours) and all(mx.array_equal(again[k], ours[k]).item() for k in ours)
    assert "model.audio_tower.subsample_conv_projection.layer0.conv.weight" in ours
    fresh = gemma4_mm.Model(gemma4_mm.ModelArgs.from_dict(_config()))
    fresh.load_weights(list(again.items()))
    ids = mx.array(ref["both_input_ids"])
    assert rel(fresh(ids, **media(ref, "both"))[:, -1], np.array(model(ids, **media(ref, "both"))[:, -1])) < 1e-6


def test_a_model_with_audio_only_generates_from_a_clip(model, ref):
    """A config without a vision_config builds the audio tower alone; with the same weights it gives
    transformers' greedy tokens on the clip, also when asked to prefill in chunks of 4."""
    audio_only = gemma4_mm.Model(gemma4_mm.ModelArgs.from_dict({**_config(), "vision_config": None}))
    weights = audio_only.sanitize(dict(mx.load(str(FOLDER / "model.safetensors"))))
    audio_only.load_weights(list(weights.items()))
    assert audio_only.image_input is None and audio_only.float_prefixes == ("model.audio_tower.", "model.embed_audio.")
    assert greedy(audio_only, ref["audio_input_ids"], media(ref, "audio"), step=4) == ref["audio_greedy"].tolist()
    with pytest.raises(ImageError, match="no vision tower"):
        audio_only.model(mx.array(ref["one_input_ids"]), **media(ref, "one"))


def test_batch_generate_with_several_images_equals_each_prompt_alone(loaded):
    """Left-padded prompts with one and two images (each its own soft-token count) give what each gives alone."""
    model, tok = loaded
    rng = np.random.default_rng(3)
    a, b, c = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 60, 3), (30, 30, 3), (90, 20, 3)))
    prompts, images = ["<|image|> what is it?", "Compare <|image|> and <|image|>, please."], [a, [b, c]]
    together = batch_generate(model, tok, prompts, max_tokens=4, image=images)
    alone = [batch_generate(model, tok, [p], max_tokens=4, image=[im])[0] for p, im in zip(prompts, images)]
    assert together == alone


def test_enable_thinking_reaches_the_chat_template(loaded):
    """generate's enable_thinking renders the template's thinking mode (text-only prompts too)."""
    model, tok = loaded
    messages = [{"role": "user", "content": "Why?"}]
    thinking = tok.apply_chat_template(messages, tokenize=True, enable_thinking=True)
    assert thinking != tok.apply_chat_template(messages, tokenize=True)
    first = next(iter(stream_generate(model, tok, "Why?", chat=True, enable_thinking=True, max_tokens=1)))
    assert first.prompt_tokens == len(thinking)
    assert first.token == greedy(model, [thinking], n=1)[0]


def test_prompt_cache_holds_an_image_and_a_clip_together(loaded, ref):
    """An image and a clip in a cached chat: the next turn feeds neither again, and equals a fresh run."""
    model, tok = loaded
    image = np.random.default_rng(5).integers(0, 256, (36, 48, 3), dtype=np.uint8)
    cache = PromptCache(model)
    list(stream_generate(model, tok, "<|image|> and <|audio|>?", chat=True, image=image, audio=tone(ref),
                         max_tokens=2, prompt_cache=cache))
    assert [d.split(":")[0] for _, _, d in cache.images] == ["image", "audio"]
    more = tok.encode(" More.", add_bos=False)
    follow = cache.tokens + more
    cached = list(stream_generate(model, tok, follow, image=image, audio=tone(ref), max_tokens=3, prompt_cache=cache))
    fresh = list(stream_generate(model, tok, follow, image=image, audio=tone(ref), max_tokens=3))
    assert cached[0].prompt_tokens == len(more) and [r.token for r in cached] == [r.token for r in fresh]
