"""PaliGemma 1 and 2 against transformers' PaliGemmaForConditionalGeneration.

The references come from tests/fixtures/make_tiny_paligemma.py (transformers
5.23, fp32, eager): logits for a left-padded batch of two prompts with two
different images, for one prompt with two images, and greedy ids.  The
PaliGemma 1 folder uses the new key layout, the PaliGemma 2 folder the old one.
"""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.errors import ConfigError, ImageError
from mlx_gemma.models import paligemma

NAMES = ["paligemma", "paligemma2"]
RTOL = 1e-4  # of the reference logits' largest magnitude


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    folder = FIXTURES / f"tiny_{request.param}"
    model, tokenizer = mlx_gemma.load(folder)
    return request.param, model, tokenizer, dict(np.load(folder / "reference.npz"))


def nhwc(pixel_values_nchw: np.ndarray) -> mx.array:
    return mx.array(pixel_values_nchw.transpose(0, 2, 3, 1))


def rel_err(ours, ref, where=None) -> float:
    d = np.abs(np.array(ours, dtype=np.float32) - ref)
    return float((d if where is None else d[where]).max() / np.abs(ref).max())


def test_architecture(loaded):
    name, model, _, _ = loaded
    assert model.args.text.model_type == ("gemma" if name == "paligemma" else "gemma2")
    assert model.args.num_image_tokens == 9
    # PaliGemma 2's window is a config setting, kept on local layers as the references do.
    assert model.windows == ([None, None] if name == "paligemma" else [28, None, 28, None])


def test_padded_batch_two_images_logits(loaded):
    _, model, _, ref = loaded
    real = ref["attention_mask"].astype(bool)
    logits = model(
        mx.array(ref["input_ids"]), pixel_values=nhwc(ref["pixel_values"]), padding_mask=mx.array(real)
    )
    # Padding positions are garbage in both implementations; real tokens must agree.
    assert rel_err(logits, ref["logits"], real) < RTOL


def test_same_prompt_two_images_logits(loaded):
    _, model, _, ref = loaded
    logits = model(mx.array(ref["same_ids"]), pixel_values=nhwc(ref["pixel_values"]))
    assert rel_err(logits, ref["same_logits"]) < RTOL
    # The two images really differ in effect.
    assert np.abs(ref["same_logits"][0, -1] - ref["same_logits"][1, -1]).max() > 1e-2


def greedy(model, ids, pixel_values, n):
    cache = model.make_cache()
    logits = model(ids, pixel_values=pixel_values, cache=cache)
    tokens, steps = [], []
    for _ in range(n):
        steps.append(logits[:, -1])
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=cache)
    return tokens, steps


def test_greedy_equals_transformers(loaded):
    _, model, _, ref = loaded
    ids, pv = mx.array(ref["input_ids"][1:]), nhwc(ref["pixel_values"][1:])  # the unpadded row
    tokens, _ = greedy(model, ids, pv, len(ref["greedy_ids"]))
    assert tokens == ref["greedy_ids"].tolist()


def test_cached_decoding_equals_full_recomputation(loaded):
    _, model, _, ref = loaded
    ids, pv = mx.array(ref["input_ids"][1:]), nhwc(ref["pixel_values"][1:])
    tokens, steps = greedy(model, ids, pv, 10)  # 25 + 10 tokens: past PaliGemma 2's window of 28
    full = model(mx.concatenate([ids, mx.array([tokens])], axis=1), pixel_values=pv, prefix_length=ids.shape[1])
    P = ids.shape[1]
    for i, step in enumerate(steps):
        np.testing.assert_allclose(np.array(step), np.array(full[:, P - 1 + i]), atol=1e-5, rtol=1e-5)


def test_prefix_is_bidirectional(loaded):
    """Scoring the prompt as prefix differs from scoring it causally (the image tokens see the text)."""
    _, model, _, ref = loaded
    ids, pv = mx.array(ref["same_ids"][:1]), nhwc(ref["pixel_values"][:1])
    prefix = model(ids, pixel_values=pv)
    causal = model(ids, pixel_values=pv, prefix_length=0)
    assert float(mx.abs(prefix[:, 0] - causal[:, 0]).max()) > 1e-3


def test_wrong_image_count_is_an_image_error(loaded):
    _, model, _, ref = loaded
    with pytest.raises(ImageError, match="2 image\\(s\\) need 18 <image> tokens.*hold 9"):
        model(mx.array(ref["input_ids"][1:]), pixel_values=nhwc(ref["pixel_values"]))


def test_wrong_pixel_shape_is_an_image_error(loaded):
    _, model, _, ref = loaded
    with pytest.raises(ImageError, match="pixel_values.*NHWC"):
        model(mx.array(ref["input_ids"][1:]), pixel_values=mx.array(ref["pixel_values"][1:]))  # NCHW


def test_text_only_call_runs_the_decoder(loaded):
    """No pixels: `<image>` placeholders embed as ordinary tokens (transformers does the same)."""
    _, model, tokenizer, _ = loaded
    ids = mx.array([tokenizer.encode("caption en\n")])
    assert model(ids).shape == (1, ids.shape[1], 512)


def test_every_key_layout_loads(tmp_path):
    """Original / mlx-vlm (`language_model.model.`, `vision_tower.vision_model.`), transformers
    >= 4.52 (`model.` prefixes) and transformers 5's vision tower without `vision_model.`."""
    from mlx_gemma.tensorfile import load_file

    src = FIXTURES / "tiny_paligemma"
    weights = load_file(src / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in weights)
    variants = {
        "old": lambda k: k.replace("model.language_model.", "language_model.model.")
        .replace("model.vision_tower.", "vision_tower.")
        .replace("model.multi_modal_projector.", "multi_modal_projector."),
        "tf5": lambda k: k.replace("vision_tower.vision_model.", "vision_tower."),
    }
    reference = mlx_gemma.load_model(src)
    ids = mx.array(np.load(src / "reference.npz")["same_ids"][:1])
    pv = nhwc(np.load(src / "reference.npz")["pixel_values"][:1])
    expected = reference(ids, pixel_values=pv)
    for name, rename in variants.items():
        folder = tmp_path / name
        shutil.copytree(src, folder)
        mx.save_safetensors(str(folder / "model.safetensors"), {rename(k): v for k, v in weights.items()},
                            metadata={"format": "pt"})
        model = mlx_gemma.load_model(folder)
        np.testing.assert_array_equal(np.array(model(ids, pixel_values=pv)), np.array(expected))


def config():
    return json.loads((FIXTURES / "tiny_paligemma2" / "config.json").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["text_config"].update(model_type="gemma3_text"), "not a PaliGemma decoder"),
        (lambda c: c.update(projection_dim=32), "projection_dim 32 differs"),
        (lambda c: c["vision_config"].update(image_size=40), "not a multiple of patch_size"),
        (lambda c: c["vision_config"].update(hidden_act="relu"), "unsupported activation"),
        (lambda c: c.update(image_token_index=-1), "image_token_index"),
        (lambda c: c.update(text_config=[]), "text_config and vision_config"),
    ],
)
def test_bad_configs_are_refused(change, message):
    c = config()
    change(c)
    with pytest.raises(ConfigError, match=message):
        paligemma.ModelArgs.from_dict(c, "config.json")


def test_missing_text_keys_take_transformers_defaults():
    args = paligemma.ModelArgs.from_dict({"model_type": "paligemma", "text_config": {}, "vision_config": {}})
    # transformers' PaliGemmaConfig defaults: PaliGemma 1 3B at 224 px.
    assert (args.text.hidden_size, args.text.num_hidden_layers, args.text.vocab_size) == (2048, 18, 257152)
    assert (args.vision.hidden_size, args.vision.num_hidden_layers, args.num_image_tokens) == (1152, 27, 256)


# ----- conversion --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_float_loads_back_equal(name, tmp_path):
    from mlx_gemma.convert import convert

    src = FIXTURES / f"tiny_{name}"
    ref = np.load(src / "reference.npz")
    out = convert(src, mlx_path=tmp_path / "out", progress=False)
    model, tokenizer = mlx_gemma.load(out)
    assert tokenizer.image_token_id == 6
    ids, pv = mx.array(ref["same_ids"]), nhwc(ref["pixel_values"])
    np.testing.assert_array_equal(
        np.array(model(ids, pixel_values=pv)), np.array(mlx_gemma.load_model(src)(ids, pixel_values=pv))
    )
    # Either source layout is written in ours.
    from mlx_gemma.tensorfile import load_file

    keys = load_file(out / "model.safetensors").keys()
    assert all(k.startswith(("model.language_model.", "model.vision_tower.vision_model.",
                             "model.multi_modal_projector.")) for k in keys)


@pytest.mark.parametrize("name", NAMES)
def test_convert_quantizes_the_language_model_only(name, tmp_path):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_gemma.convert import convert

    src = FIXTURES / f"tiny_{name}"
    out = convert(src, mlx_path=tmp_path / "q", quantize=True, q_bits=4, q_group_size=32, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    model = mlx_gemma.load_model(out)
    source = mlx_gemma.load_model(src)
    params, float_params = dict(tree_flatten(model.parameters())), dict(tree_flatten(source.parameters()))
    for k, v in params.items():
        if k.startswith(paligemma.Model.float_prefixes):
            assert mx.array_equal(v, float_params[k]), k  # vision tower and projector stay float, untouched
    assert "model.language_model.layers.0.mlp.down_proj.scales" in params
    assert not any(k.endswith(".scales") for k in params if "vision" in k or "projector" in k)
    # The folder holds exactly what quantizing the source in memory gives.
    nn.quantize(source, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in params)
    ref = np.load(src / "reference.npz")
    ids, pv = mx.array(ref["same_ids"]), nhwc(ref["pixel_values"])
    np.testing.assert_array_equal(np.array(model(ids, pixel_values=pv)), np.array(source(ids, pixel_values=pv)))


# ----- generation with images --------------------------------------------------------


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    ref = np.load(FIXTURES / "tiny_paligemma" / "reference.npz")  # both fixtures share the images' shapes
    paths = []
    for i in range(2):
        paths.append(folder / f"image{i}.png")
        Image.fromarray(ref[f"image{i}"]).save(paths[-1])
    return paths


def test_stream_generate_with_an_image_equals_transformers_greedy(loaded):
    from mlx_gemma.generate import stream_generate

    _, model, tokenizer, ref = loaded
    # A small prefill step must not split the prompt: it attends both ways.
    tokens = [r.token for r in stream_generate(model, tokenizer, "detect cat ; dog", max_tokens=10,
                                               image=ref["image1"], prefill_step_size=4)]
    assert tokens == ref["greedy_ids"].tolist()


def test_batch_generate_with_two_images_equals_transformers(loaded):
    from mlx_gemma.generate import stream_batch_generate

    _, model, tokenizer, ref = loaded
    rows = [[], []]
    for step in stream_batch_generate(model, tokenizer, ["caption en", "detect cat ; dog"], max_tokens=10,
                                      image=[ref["image0"], ref["image1"]], stop_token_ids=[]):
        for b, r in enumerate(step):
            if r is not None:
                rows[b].append(r.token)
    assert rows == ref["batch_greedy_ids"].tolist()  # the first row is left-padded


def test_generation_image_errors(loaded):
    from mlx_gemma.errors import GenerationError
    from mlx_gemma.generate import batch_generate, generate

    _, model, tokenizer, ref = loaded
    with pytest.raises(ImageError, match="2 images for 3 prompts"):
        batch_generate(model, tokenizer, ["a", "b", "c"], image=[ref["image0"], ref["image1"]])
    with pytest.raises(GenerationError, match="no chat template"):
        generate(model, tokenizer, "caption en", image=ref["image0"], chat=True)
    text_model, text_tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma")
    with pytest.raises(ImageError, match="takes no images"):
        generate(text_model, text_tokenizer, "caption en", image=ref["image0"])


def test_cli_image_flags(image_files, capsys):
    """The CLI prints what `generate` gives (whose tokens equal transformers', above)."""
    from mlx_gemma.generate import generate, main

    folder = FIXTURES / "tiny_paligemma"
    model, tokenizer = mlx_gemma.load(folder)
    expected = [generate(model, tokenizer, "detect cat ; dog", max_tokens=10, image=p) for p in image_files]
    argv = ["--model", str(folder), "-p", "detect cat ; dog", "--max-tokens", "10"]
    assert main(argv + ["--image", str(image_files[1])]) == 0
    assert capsys.readouterr().out == expected[1] + "\n"
    assert main(argv + ["--image", str(image_files[1]), "--image", str(image_files[0])]) == 0
    assert capsys.readouterr().out == f"[{image_files[1]}]\n{expected[1]}\n[{image_files[0]}]\n{expected[0]}\n"
    assert main(argv + ["--image", str(image_files[0].with_name("missing.png"))]) == 2
    assert "missing.png: no such image file" in capsys.readouterr().err


def test_quantized_folder_in_the_mlx_vlm_layout_loads(tmp_path):
    """mlx-community PaliGemma folders (mlx-vlm) name weights the original way and keep the
    conv kernel channels-last; quantized layers come with `.scales` / `.biases`."""
    from mlx_gemma.convert import convert
    from mlx_gemma.tensorfile import load_file

    src = FIXTURES / "tiny_paligemma"
    ours = convert(src, mlx_path=tmp_path / "ours", quantize=True, q_group_size=32, progress=False)
    vlm = tmp_path / "vlm"
    shutil.copytree(ours, vlm)
    weights = load_file(ours / "model.safetensors")
    renamed = {k.replace("model.language_model.", "language_model.model.")
               .replace("model.vision_tower.", "vision_tower.")
               .replace("model.multi_modal_projector.", "multi_modal_projector."): v for k, v in weights.items()}
    assert any(k.startswith("language_model.model.") and k.endswith(".scales") for k in renamed)
    mx.save_safetensors(str(vlm / "model.safetensors"), renamed, metadata={"format": "mlx"})
    ref = np.load(src / "reference.npz")
    ids, pv = mx.array(ref["same_ids"]), nhwc(ref["pixel_values"])
    np.testing.assert_array_equal(np.array(mlx_gemma.load_model(vlm)(ids, pixel_values=pv)),
                                  np.array(mlx_gemma.load_model(ours)(ids, pixel_values=pv)))


@pytest.mark.oracle
@pytest.mark.parametrize("which", ["paligemma-3b-224", "paligemma2-3b-448"])
def test_real_sizes_have_transformers_weight_names_and_shapes(which):
    """Full-size configs: every transformers parameter has our counterpart of the same shape
    (built on torch's meta device and MLX's lazy arrays: nothing is allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlx.utils import tree_flatten

    if which == "paligemma-3b-224":
        config = transformers.PaliGemmaConfig()  # its defaults are PaliGemma 1 3B at 224 px
    else:  # PaliGemma 2 3B at 448 px (Gemma 2 2B decoder)
        config = transformers.PaliGemmaConfig(
            text_config=transformers.Gemma2Config(
                hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                num_key_value_heads=4, head_dim=256, vocab_size=257216),
            vision_config=transformers.SiglipVisionConfig(
                hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                patch_size=14, image_size=448, vision_use_head=False),
            projection_dim=2304, image_token_index=257152, vocab_size=257216,
        )
    with torch.device("meta"):
        reference = transformers.PaliGemmaForConditionalGeneration(config)
    expected = {paligemma.canonical_key(k): tuple(v.shape) for k, v in reference.state_dict().items()
                if k != "lm_head.weight"}  # tied
    model = paligemma.Model(paligemma.ModelArgs.from_dict(config.to_dict()))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    conv = "model.vision_tower.vision_model.embeddings.patch_embedding.weight"
    o, i, kh, kw = expected[conv]
    expected[conv] = (o, kh, kw, i)  # channels-last in MLX
    assert ours == expected
    assert model.args.num_image_tokens == (256 if which.endswith("224") else 1024)


@pytest.mark.parametrize("dtype, tolerance", [(mx.bfloat16, 0.1), (mx.float16, 0.02)])
def test_half_precision_stays_half(loaded, dtype, tolerance):
    """Pixels and image features follow the weights' dtype (no silent float32 promotion) and the
    logits stay near transformers' float32 ones."""
    name, _, _, ref = loaded
    model = mlx_gemma.load_model(FIXTURES / f"tiny_{name}", dtype=dtype)
    hidden = model.model(mx.array(ref["same_ids"]), pixel_values=nhwc(ref["pixel_values"]))
    assert hidden.dtype == dtype
    assert rel_err(model.logits(hidden).astype(mx.float32), ref["same_logits"]) < tolerance
