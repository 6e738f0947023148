"""keras-hub style Gemma4CausalLM (mlx_gemma/tasks/gemma4_causal_lm.py) on the tiny keras-hub Gemma 4 presets.

References are keras-hub 0.32's, recorded by tests/fixtures/make_keras_gemma4.py: the prompts packed as
its Gemma4CausalLMPreprocessor packs them (`<bos>` + SentencePiece ids, right-padded, no `<eos>`; its
preprocessor itself needs TensorFlow, which the test environment lacks), the backbone's logits, and
`Gemma4CausalLM(preprocessor=None).generate`'s greedy ids; with an image on the vision preset, recorded
by tests/fixtures/make_keras_gemma4_generate.py.  Prompts with images and audio on the tiny model with
both towers (tests/fixtures/tiny_gemma4_mm) must give `mlx_gemma.generate`'s ids and greedy tokens
(themselves checked against transformers' Gemma4Processor and model in test_gemma4_mm.py).  Preset
names are checked against keras-hub's own preset table and resolved through a fake, offline Hugging
Face cache.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
from conftest import FIXTURES
from test_loading import prepare_hub_cache

import mlx_gemma
from mlx_gemma.errors import MlxGemmaError, ModelFileError, UnsupportedModelError
from mlx_gemma.tasks import GEMMA4_PRESETS, Gemma4CausalLM

pytest.importorskip("h5py", reason="reading Keras presets needs h5py")

PRESETS = {"e2b": FIXTURES / "keras_gemma4_e2b", "moe": FIXTURES / "keras_gemma4_moe"}
PROMPTS = ["The capital of France is", "Why is the sky blue?"]  # as make_keras_gemma4.py's
LENGTH, GREEDY = 16, 8
RTOL = 1e-4


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Keras presets convert into a cache: keep it in the test's own folder."""
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))


def reference(name: str) -> dict:
    return dict(np.load(PRESETS[name] / "reference.npz"))


def test_prompts_are_laid_out_as_keras_hubs_preprocessor():
    lm = Gemma4CausalLM.from_preset(PRESETS["e2b"], sequence_length=LENGTH)
    ref = reference("e2b")
    packed = lm.preprocessor.generate_preprocess(PROMPTS)
    assert packed["token_ids"].tolist() == ref["token_ids"].tolist()
    assert packed["padding_mask"].tolist() == ref["padding_mask"].astype(bool).tolist()


def test_chat_prompt_control_pieces_become_their_tokens():
    """keras-hub's tokenizer is SentencePiece, which matches user-defined pieces such as `<|turn>` in text."""
    lm = Gemma4CausalLM.from_preset(PRESETS["e2b"], sequence_length=32)
    prompt = "<|turn>user\nWhy is the sky blue?<turn|>\n<|turn>model\n"
    sp = spm.SentencePieceProcessor(model_file=str(PRESETS["e2b"] / "assets" / "tokenizer" / "vocabulary.spm"))
    want = [sp.bos_id(), *sp.encode(prompt)]
    packed = lm.preprocessor.generate_preprocess(prompt)
    assert packed["token_ids"][:len(want)].tolist() == want and packed["padding_mask"].sum() == len(want)
    assert lm.preprocessor.tokenizer.piece_to_id("<|turn>") in want


@pytest.mark.parametrize("name", ["e2b", "moe"])
def test_generate_reproduces_keras_hub(name):
    """Greedy, no stop ids: the packed prompts padded by 8 give keras-hub's recorded ids; the string
    form gives the same ids' text (keras-hub's postprocess: special tokens dropped)."""
    ref = reference(name)
    lm = Gemma4CausalLM.from_preset(PRESETS[name], preprocessor=None)
    pad = ((0, 0), (0, GREEDY))
    out = lm.generate({"token_ids": np.pad(ref["token_ids"], pad), "padding_mask": np.pad(ref["padding_mask"], pad)},
                      stop_token_ids=None)
    assert np.asarray(out["token_ids"]).tolist() == ref["greedy"].tolist()
    texts = Gemma4CausalLM.from_preset(PRESETS[name]).generate(PROMPTS, max_length=LENGTH + GREEDY,
                                                               stop_token_ids=None)
    tok = mlx_gemma.GemmaTokenizer.from_folder(PRESETS[name])
    want = [tok.detokenize([i for i in row if i not in tok.special_token_ids]) for row in ref["greedy"].tolist()]
    assert texts == want


def test_score_and_predict_give_keras_hubs_logits():
    ref = reference("moe")
    lm = Gemma4CausalLM.from_preset(PRESETS["moe"], sequence_length=LENGTH)
    mask = ref["padding_mask"].astype(bool)
    logits = np.asarray(lm.score(ref["token_ids"], ref["padding_mask"]))
    scale = np.abs(ref["logits"]).max()
    assert np.abs(logits[mask] - ref["logits"][mask]).max() < RTOL * scale
    predicted = lm.predict(PROMPTS)
    assert np.abs(predicted[mask] - ref["logits"][mask]).max() < RTOL * scale


def test_a_preset_with_a_vision_encoder_serves_text():
    """Its language half: keras-hub's logits for the prompt's text before the image (which those
    positions cannot see) are the task's score of that text alone."""
    ref = dict(np.load(FIXTURES / "keras_gemma4_vision" / "reference.npz"))
    lm = Gemma4CausalLM.from_preset(FIXTURES / "keras_gemma4_vision", preprocessor=None)
    assert lm.backbone.model.args.model_type == "gemma4_text"
    boi = mlx_gemma.GemmaTokenizer.from_folder(FIXTURES / "keras_gemma4_vision").piece_to_id("<|image>")
    n = int(np.argmax(ref["token_ids"][0] == boi)) + 1  # through <|image>, before the first soft token
    logits = np.asarray(lm.score(ref["token_ids"][:, :n], np.ones((1, n), bool)))
    assert np.abs(logits - ref["logits"][:, :n]).max() < RTOL * np.abs(ref["logits"][:, :n]).max()


def test_auto_stop_ids_are_gemma4s():
    """<eos>, <turn|> and <|tool_response> (Gemma 4's generation_config; keras-hub's "auto" has the first two)."""
    lm = Gemma4CausalLM.from_preset(PRESETS["e2b"])
    tok = lm.preprocessor.tokenizer
    assert lm._stop_ids("auto") == (tok.end_token_id, tok.piece_to_id("<turn|>"), tok.piece_to_id("<|tool_response>"))
    assert lm._stop_ids(None) is None and lm._stop_ids([7]) == (7,)
    # a stop id ends a row: the greedy token at the first generated position of row 0
    ref = reference("e2b")
    first = int(ref["greedy"][0, int(ref["padding_mask"][0].sum())])
    out = Gemma4CausalLM.from_preset(PRESETS["e2b"], preprocessor=None).generate(
        {"token_ids": np.pad(ref["token_ids"], ((0, 0), (0, GREEDY))),
         "padding_mask": np.pad(ref["padding_mask"], ((0, 0), (0, GREEDY)))}, stop_token_ids=[first])
    n = int(ref["padding_mask"][0].sum())
    assert out["padding_mask"][0].sum() == n + 1 and out["token_ids"][0, n] == first


def test_fit_with_lora_lowers_the_loss():
    lm = Gemma4CausalLM.from_preset(PRESETS["e2b"], sequence_length=16)
    lm.backbone.enable_lora(2)
    lm.compile(learning_rate=1e-2)
    history = lm.fit(["The capital of France is Paris.", "Why is the sky blue?"] * 2, batch_size=2, epochs=3,
                     verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[2] < losses[1] < losses[0]


def keras_hub_gemma4_presets() -> dict:
    """keras-hub's Gemma 4 preset table, read as data from its source (no Keras import)."""
    spec = importlib.util.find_spec("keras_hub")
    path = Path(spec.origin).parent / "src" / "models" / "gemma4" / "gemma4_presets.py" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("keras-hub is not installed")
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "backbone_presets":
            return ast.literal_eval(node.value)
    pytest.skip("keras-hub's gemma4_presets.py has no backbone_presets")


def test_preset_names_are_keras_hubs_and_map_to_googles_repos():
    theirs = {k: v for k, v in keras_hub_gemma4_presets().items() if not k.endswith("_assistant")}
    assert set(GEMMA4_PRESETS) == set(theirs)
    for name, p in GEMMA4_PRESETS.items():
        assert p.kaggle == theirs[name]["kaggle_handle"] and p.instruct == ("instruct" in name)
    repos = {name: p.hf_repo for name, p in GEMMA4_PRESETS.items()}
    assert repos == {
        "gemma4_2b": "google/gemma-4-E2B", "gemma4_instruct_2b": "google/gemma-4-E2B-it",
        "gemma4_4b": "google/gemma-4-E4B", "gemma4_instruct_4b": "google/gemma-4-E4B-it",
        "gemma4_26b_a4b": "google/gemma-4-26B-A4B", "gemma4_instruct_26b_a4b": "google/gemma-4-26B-A4B-it",
        "gemma4_31b": "google/gemma-4-31B", "gemma4_instruct_31b": "google/gemma-4-31B-it"}


def test_preset_name_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    prepare_hub_cache(tmp_path / "hub", "google/gemma-4-E2B-it", FIXTURES / "tiny_gemma4_e2b")
    by_name = Gemma4CausalLM.from_preset("gemma4_instruct_2b", preprocessor=None)
    by_handle = Gemma4CausalLM.from_preset("hf://google/gemma-4-E2B-it", preprocessor=None)
    ids = np.array([[2, 30, 40, 50, 0, 0]])
    mask = ids != 0
    assert (by_name.score(ids, mask) == by_handle.score(ids, mask)).all()
    assert by_name.backbone.model.args.num_kv_shared_layers == 2


def test_bad_uses_are_refused():
    with pytest.raises(MlxGemmaError, match="load_weights"):
        Gemma4CausalLM.from_preset("gemma4_2b", load_weights=False)
    with pytest.raises(UnsupportedModelError, match="Gemma 4"):
        Gemma4CausalLM.from_preset(FIXTURES / "tiny_gemma3")
    with pytest.raises(ModelFileError, match="Did you mean: gemma4_instruct_26b_a4b"):
        Gemma4CausalLM.from_preset("instruct_26b")


def test_exported_at_the_top():
    assert mlx_gemma.Gemma4CausalLM is Gemma4CausalLM
    assert mlx_gemma.Gemma4CausalLMPreprocessor is mlx_gemma.tasks.Gemma4CausalLMPreprocessor


# ----- images and audio -------------------------------------------------------------------------

VISION = FIXTURES / "keras_gemma4_vision"
MM = FIXTURES / "tiny_gemma4_mm"


@pytest.mark.parametrize("case", ["single", "batch", "stop"])
def test_generate_with_an_image_reproduces_keras_hub(case):
    """keras-hub's Gemma4CausalLM(preprocessor=None).generate on the vision preset, greedy, recorded by
    tests/fixtures/make_keras_gemma4_generate.py: one image prompt, a right-padded batch of two, and
    the batch with a stop id (its returned padding_mask too); ids equal."""
    ref = dict(np.load(FIXTURES / "keras_gemma4_vision_generate.npz"))
    keys = ("token_ids", "padding_mask", "pixel_values", "pixel_position_ids")
    inputs = {k: ref[f"{case}_{k}"] for k in keys}
    stops = ref["stop_stop_ids"].tolist() if case == "stop" else None
    lm = Gemma4CausalLM.from_preset(VISION, preprocessor=None)
    out = lm.generate(inputs, stop_token_ids=stops)
    assert out["token_ids"].tolist() == ref[f"{case}_greedy_ids"].tolist()
    assert out["padding_mask"].tolist() == ref[f"{case}_greedy_mask"].astype(bool).tolist()
    assert out["pixel_values"] is not None and np.array_equal(out["pixel_values"], inputs["pixel_values"])
    if case == "single":  # the unbatched form: the same row
        one = lm.generate({k: v[0] for k, v in inputs.items()}, stop_token_ids=stops)
        assert one["token_ids"].tolist() == out["token_ids"][0].tolist()


@pytest.fixture(scope="module")
def mm_media():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 60, 3), (30, 90, 3), (64, 32, 3))]
    clip = np.load(MM / "reference.npz")["pcm"].astype(np.float32) / 32768.0
    return images, clip


def test_media_prompts_equal_our_generate(mm_media):
    """{"prompts", "images", "audio"} for a batch (an image and a clip; two images): each row's ids are
    `mlx_gemma.generate`'s for that prompt alone (Gemma4Processor's layout), its media keras-hub's packed
    arrays, and its greedy tokens a lone stream_generate's with the same media; the string form is the
    postprocessed dict form."""
    from mlx_gemma.gemma4_prompts import media_rows
    from mlx_gemma.generate import stream_generate

    (a, b, c), clip = mm_media
    prompts = ["Describe <|image|> and <|audio|>.", "<|image|> versus <|image|>: which is wider?"]
    x = {"prompts": prompts, "images": [[a], [b, c]], "audio": [clip, None]}
    lm = Gemma4CausalLM.from_preset(MM, sequence_length=200)
    packed = lm.preprocessor.generate_preprocess(x)
    assert packed["pixel_values"].shape[:2] == (2, 2) and packed["audio_mel"].shape[:2] == (2, 1)
    assert (packed["pixel_position_ids"][0, 1] == -1).all() and not packed["audio_mel_mask"][1].any()  # padding items
    model, tok = mlx_gemma.load(str(MM))
    stops = lm._stop_ids("auto")
    out = Gemma4CausalLM.from_preset(MM, preprocessor=None).generate(packed, stop_token_ids=stops)
    for row, (prompt, images, audio) in enumerate(zip(prompts, x["images"], x["audio"])):
        ids = media_rows(model, tok, [prompt], [images], [audio])[0][0]
        n = int(packed["padding_mask"][row].sum())
        assert packed["token_ids"][row, :n].tolist() == ids
        ours = [r.token for r in stream_generate(model, tok, prompt, image=images, audio=audio, max_tokens=200 - n,
                                                 stop_token_ids=stops)]
        assert out["token_ids"][row, n:n + len(ours)].tolist() == ours
        assert int(out["padding_mask"][row].sum()) == n + len(ours)  # kept up to its stop (or the end)
    texts = lm.generate(x, stop_token_ids=stops)
    assert texts == lm.preprocessor.generate_postprocess(out)
    assert "<|image>" in texts[0] and not any(p in texts[0] for p in ("<|image|>", "<image|>", "<|audio|>"))
    one = lm.generate({"prompts": prompts[0], "images": a, "audio": clip}, stop_token_ids=stops)
    assert one == texts[0]


def test_bad_media_inputs_are_typed_errors(mm_media):
    from mlx_gemma.errors import AudioError, ImageError

    (a, b, c), clip = mm_media
    lm = Gemma4CausalLM.from_preset(MM, sequence_length=200)
    with pytest.raises(ImageError, match="1 <\\|image\\|> markers for 2"):
        lm.generate({"prompts": "<|image|>", "images": [a, b]})
    with pytest.raises(ImageError, match="0 <\\|image\\|> markers for 1"):  # keras-hub places media at markers only
        lm.generate({"prompts": "Describe it.", "images": a})
    with pytest.raises(AudioError, match="most per prompt is 1"):
        lm.generate({"prompts": "<|audio|> <|audio|>", "audio": [clip, clip]})
    with pytest.raises(ImageError, match="one entry"):
        lm.generate({"prompts": ["<|image|>", "<|image|>"], "images": [a]})
    with pytest.raises(ImageError, match="cuts a media block"):
        lm.generate({"prompts": "<|image|> Describe it", "images": a}, max_length=8)
    packed = lm.preprocessor.generate_preprocess({"prompts": "<|image|> and <|image|>", "images": [a, b]})
    bare = Gemma4CausalLM.from_preset(MM, preprocessor=None)
    with pytest.raises(ImageError, match="at least 2 items"):
        bare.generate({**packed, "pixel_values": packed["pixel_values"][:1], "pixel_position_ids":
                       packed["pixel_position_ids"][:1]}, stop_token_ids=None)
    text_only = Gemma4CausalLM.from_preset(PRESETS["e2b"])
    with pytest.raises(ImageError, match="no vision or audio tower"):
        text_only.generate({"prompts": "<|image|>", "images": a})
    with pytest.raises(ImageError, match="no vision or audio tower"):
        Gemma4CausalLM.from_preset(PRESETS["e2b"], preprocessor=None).generate(
            packed, stop_token_ids=None)


def test_generate_with_a_clip_reproduces_keras_hub():
    """keras-hub's greedy Gemma4CausalLM.generate with a clip on the tiny audio preset (its log-mel
    frames and mask packed as keras-hub's preprocessor hands them over; recorded by make_keras_gemma4.py
    as `greedy`): ids equal."""
    folder = FIXTURES / "keras_gemma4_audio"
    if not (folder / "reference.npz").is_file():
        pytest.skip("the keras-hub audio preset fixture is not in this tree")
    ref = dict(np.load(folder / "reference.npz"))
    pad = ((0, 0), (0, ref["greedy"].shape[1] - ref["token_ids"].shape[1]))
    inputs = {"token_ids": np.pad(ref["token_ids"], pad), "padding_mask": np.pad(ref["padding_mask"], pad),
              "audio_mel": ref["audio_mel"], "audio_mel_mask": ref["audio_mel_mask"]}
    lm = Gemma4CausalLM.from_preset(folder, preprocessor=None)
    assert lm.generate(inputs, stop_token_ids=None)["token_ids"].tolist() == ref["greedy"].tolist()
