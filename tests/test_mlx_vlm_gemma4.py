"""Gemma 4 folders with towers and mlx-vlm 0.7.10, both ways.

mlx-vlm's own convert (float, uniform 4-bit, its mixed_4_6 recipe) of tiny Hugging Face folders
(E2B-like with vision and audio; a 26B-A4B-like MoE with vision) loads with `mlx_gemma.load`, its
logits equal mlx-vlm's on the same folder (text, an image, a clip) and, float, transformers';
the folders our converter writes load in mlx-vlm with our logits.  What a folder gets wrong is a
typed error naming the file and the key.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError, ModelFileError, WeightsMismatchError
from mlx_gemma.models import gemma4

from conftest import FIXTURES

MM = FIXTURES / "tiny_gemma4_mm"
RTOL = 1e-4
# What mlx-vlm 0.7.10's gemma4 builds from a config.json (its config.py TextConfig reads these keys only).
VLM_TEXT_KEYS = {"global_head_dim": 32}


def rel_err(ours, ref) -> float:
    """Largest difference over the reference's largest magnitude."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def e2b_source(path: Path) -> Path:
    """tiny_gemma4_mm (transformers' names) as mlx-vlm can read it: its audio linears clipped (mlx-vlm's
    audio tower always clips: audio.py ClippableLinear) with bounds that do clip, the global head dim spelled
    out (mlx-vlm config.py reads `global_head_dim`, not `per_layer_config`), and text attention causal over
    images (mlx-vlm language.py `_make_masks` lets an image see itself on global layers too, transformers
    5.25 on sliding layers only; E2B's own config has no bidirectional attention)."""
    shutil.copytree(MM, path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(VLM_TEXT_KEYS, use_bidirectional_attention=None)
    config["audio_config"].update(use_clipped_linears=True, output_proj_dims=32)
    weights = dict(mx.load(str(path / "model.safetensors")))
    rng = np.random.default_rng(0)
    # audio soft tokens 32 wide (the fixture's 24), so that mlx-vlm's recipes quantize the audio embedder
    # (its skip_multimodal_module spares `audio_tower` and anything named `vision`, not `embed_audio`)
    for key, shape in (("model.audio_tower.output_proj.weight", (32, 16)), ("model.audio_tower.output_proj.bias", (32,)),
                       ("model.embed_audio.embedding_projection.weight", (32, 32))):
        weights[key] = mx.array(rng.normal(0, 0.3, shape).astype(np.float32))
    for key in [k for k in weights if k.startswith("model.audio_tower.layers.") and k.endswith(".linear.weight")]:
        base = key[: -len(".linear.weight")]
        for side in ("input", "output"):
            low, high = -rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)
            weights[f"{base}.{side}_min"], weights[f"{base}.{side}_max"] = mx.array(low), mx.array(high)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    return path


def moe_source(path: Path, seed: int = 0) -> Path:
    """A 26B-A4B-like `gemma4` folder in transformers' names: a MoE text model whose widths are multiples
    of 64 (so mlx-vlm's recipes, group size 64, quantize every kind of text layer: experts, router,
    per-layer table), with tiny_gemma4_mm's vision tower and a fresh embedder into the wider text."""
    text = {
        "model_type": "gemma4_text", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 64,
        "num_hidden_layers": 6, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
        "global_head_dim": 64, "sliding_window": 8, "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 512, "final_logit_softcapping": 30.0, "use_double_wide_mlp": False,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "per_layer_config": {"2": {"head_dim": 64}, "5": {"head_dim": 64}}, "enable_moe_block": True,
        "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 64, "pad_token_id": 0,
        "rope_parameters": {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1e6,
                                               "rope_type": "proportional"},
                            "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}},
    }
    mm = json.loads((MM / "config.json").read_text())
    config = {**{k: v for k, v in mm.items() if k != "audio_config"}, "text_config": text,
              "architectures": ["Gemma4ForConditionalGeneration"]}
    model = gemma4.Model(gemma4.ModelArgs.from_dict(text))
    mx.random.seed(seed)
    model.update(tree_map(lambda p: p + 0.08 * mx.random.normal(p.shape), model.parameters()))
    weights = {}
    for key, value in tree_flatten(model.parameters()):  # transformers: experts as bare tensors
        name = key.removesuffix(".weight") if ".experts." in key else key
        weights["model.language_model." + name.removeprefix("model.")] = value
    tower = mx.load(str(MM / "model.safetensors"))
    weights.update({k: v for k, v in tower.items() if k.startswith("model.vision_tower.")})
    weights["model.embed_vision.embedding_projection.weight"] = 0.2 * mx.random.normal((64, 32))
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config, indent=1))
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    for name in ("tokenizer.model", "processor_config.json"):
        shutil.copy(MM / name, path / name)
    return path


REF = dict(np.load(MM / "reference.npz"))
IMAGE = {"pixel_values": mx.array(REF["one_pixel_values"].astype(np.float32) / 255.0),
         "image_positions": mx.array(REF["one_image_position_ids"])}
AUDIO = {"audio_features": mx.array(REF["audio_input_features"]), "audio_mask": mx.array(REF["audio_input_features_mask"])}
TEXT_IDS = mx.array([[2, 17, 301, 45, 9, 88, 120, 7, 7, 400, 3, 51]])
# (prompt ids, our keywords, mlx-vlm's keywords): text, case "one" (an image), case "audio" (a clip)
PROMPTS = {
    "text": (TEXT_IDS, {}, {}),
    "image": (mx.array(REF["one_input_ids"]), IMAGE,
              {"pixel_values": IMAGE["pixel_values"], "image_position_ids": IMAGE["image_positions"]}),
    "audio": (mx.array(REF["audio_input_ids"]), AUDIO,
              {"input_features": AUDIO["audio_features"], "input_features_mask": AUDIO["audio_mask"]}),
}
# Our convert and mlx-vlm's, per case: (source, our options, mlx-vlm's options)
QUANT = {"float": ({}, {}),
         "q4": ({"quantize": True, "q_bits": 4, "q_group_size": 32}, {"quantize": True, "q_bits": 4, "q_group_size": 32}),
         "mixed_4_6": ({"quantize": True, "quant_recipe": "mixed_4_6"}, {"quantize": True, "quant_predicate": "mixed_4_6"})}
CASES = [("e2b", "float"), ("e2b", "q4"), ("moe", "float"), ("moe", "q4"), ("moe", "mixed_4_6")]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"e2b": e2b_source(root / "e2b"), "moe": moe_source(root / "moe")}


def mlx_vlm_convert(src: Path, dest: Path, **options) -> Path:
    """mlx-vlm 0.7.10's own convert of `src` (it writes tokenizer.json; mlx_gemma rebuilds the model from it)."""
    vlm_convert = pytest.importorskip("mlx_vlm.convert").convert
    vlm_convert(str(src), mlx_path=str(dest), **options)
    return dest


def mlx_vlm_model(folder: Path):
    return pytest.importorskip("mlx_vlm.utils").load_model(folder)


def same_logits(ours, theirs, kind: str) -> None:
    """Our logits equal mlx-vlm's for every prompt the model takes (audio: E2B only)."""
    for name, (ids, ours_kw, theirs_kw) in PROMPTS.items():
        if name == "audio" and kind != "e2b":
            continue
        assert rel_err(ours(ids, **ours_kw), theirs(ids, **theirs_kw).logits) < RTOL, name


def layer_bits(model) -> dict[str, int]:
    """Module path -> bits of every quantized layer (ours or mlx-vlm's)."""
    return {name: m.bits for name, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "scales")}


def ours_name(name: str) -> str:
    """An mlx-vlm module path as ours (the gate half of its experts stands for our joined gate_up)."""
    name = name.replace("switch_glu.gate_proj", "gate_up_proj").replace("switch_glu.", "")
    if name.startswith("language_model.model."):
        return "model.language_model." + name[len("language_model.model."):]
    return name if name.startswith("language_model.") else "model." + name


@pytest.mark.oracle
@pytest.mark.parametrize("kind,quant", CASES)
def test_an_mlx_vlm_folder_loads_with_its_logits(tmp_path, sources, kind, quant):
    """mlx-vlm's folder loads as it is (per-layer settings under its names, experts as switch_glu halves,
    towers float, tokenizer.json only): our logits equal mlx-vlm's on text, an image and a clip, and every
    layer has the bits mlx-vlm gave it (mixed_4_6: 6 on some, 8-bit routers under q4)."""
    folder = mlx_vlm_convert(sources[kind], tmp_path / "vlm", **QUANT[quant][1])
    model, tokenizer = mlx_gemma.load(folder)
    theirs = mlx_vlm_model(folder)
    same_logits(model, theirs, kind)
    ours_bits = layer_bits(model)
    expected = {ours_name(name): bits for name, bits in layer_bits(theirs).items() if ".switch_glu.up_proj" not in name}
    assert ours_bits == expected and bool(ours_bits) == (quant != "float")
    if kind == "e2b" and quant != "float":  # a tower's embedder quantized, the towers float
        assert "model.embed_audio.embedding_projection" in ours_bits
        assert not [name for name in ours_bits if "_tower." in name]
    if quant == "mixed_4_6":
        assert 6 in ours_bits.values()


@pytest.mark.oracle
def test_an_mlx_vlm_float_folder_equals_transformers(tmp_path, sources):
    """The float E2B-like folder mlx-vlm wrote, with the fixture's own `use_bidirectional_attention: "vision"`
    put back, gives transformers' logits for an image prompt (tests/fixtures/tiny_gemma4_mm/reference.npz)."""
    folder = mlx_vlm_convert(sources["e2b"], tmp_path / "vlm")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["use_bidirectional_attention"] = "vision"
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = mlx_gemma.load(folder)
    ids, kw, _ = PROMPTS["image"]
    logits = model(ids, **kw)[:, mx.array(REF["one_positions"])]
    assert rel_err(logits, REF["one_logits"]) < RTOL


@pytest.mark.oracle
def test_an_mlx_vlm_moe_float_folder_equals_transformers(tmp_path, sources):
    """The MoE folder mlx-vlm wrote gives what transformers' Gemma4ForConditionalGeneration computes on the
    source folder (live, fp32 eager), for text and an image."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = mlx_vlm_convert(sources["moe"], tmp_path / "vlm")
    model, _ = mlx_gemma.load(folder)
    hf = transformers.Gemma4ForConditionalGeneration.from_pretrained(
        sources["moe"], attn_implementation="eager", dtype=torch.float32).eval()
    for name in ("text", "image"):
        ids, kw, theirs_kw = PROMPTS[name]
        inputs = {"input_ids": torch.tensor(np.array(ids))}
        if kw:
            inputs.update(pixel_values=torch.tensor(np.array(kw["pixel_values"])),
                          image_position_ids=torch.tensor(np.array(kw["image_positions"])),
                          mm_token_type_ids=torch.tensor(REF["one_mm_token_type_ids"]))
        with torch.no_grad():
            expected = hf(**inputs).logits.numpy()
        assert rel_err(model(ids, **kw), expected) < RTOL, name


@pytest.mark.oracle
@pytest.mark.parametrize("kind,quant", CASES)
def test_our_folder_loads_in_mlx_vlm_with_our_logits(tmp_path, sources, kind, quant):
    """The folder our converter writes from transformers' layout (no `global_head_dim` in it: we spell it
    out) loads in mlx-vlm: its logits equal ours on text, an image and a clip, its layers have our bits."""
    src = sources[kind]
    if kind == "e2b":  # transformers' own spelling of the global layers' shape (per_layer_config only)
        src = Path(shutil.copytree(src, tmp_path / "hf"))
        config = json.loads((src / "config.json").read_text())
        del config["text_config"]["global_head_dim"]
        (src / "config.json").write_text(json.dumps(config))
    dest = convert(src, mlx_path=tmp_path / "ours", progress=False, **QUANT[quant][0])
    config = json.loads((dest / "config.json").read_text())
    assert not [k for k in config.get("quantization", {}) if k.startswith("model.")]  # mlx-vlm's module paths
    model, _ = mlx_gemma.load(dest)
    theirs = mlx_vlm_model(dest)
    same_logits(model, theirs, kind)
    ours_bits = {k.replace("model.language_model.", "language_model.model."): v for k, v in layer_bits(model).items()}
    theirs_bits = layer_bits(theirs)
    for name, bits in ours_bits.items():
        if ".experts.gate_up_proj" in name:
            halves = [name.replace("gate_up_proj", f"switch_glu.{h}") for h in ("gate_proj", "up_proj")]
            assert [theirs_bits[h] for h in halves] == [bits, bits], name
        else:
            assert theirs_bits[name.replace(".experts.", ".experts.switch_glu.")] == bits, name


@pytest.mark.oracle
@pytest.mark.parametrize("quant", ["float", "mixed_4_6"])
def test_our_moe_folder_with_towers_serves_text_in_mlx_lm(tmp_path, sources, quant):
    """mlx-lm 0.32 reads the text half of the same folder (its gemma4.py drops the towers, splits only bare
    expert tensors): the logits for text equal ours."""
    mlx_lm_utils = pytest.importorskip("mlx_lm.utils")
    dest = convert(sources["moe"], mlx_path=tmp_path / "ours", progress=False, **QUANT[quant][0])
    model, _ = mlx_gemma.load(dest)
    theirs, _ = mlx_lm_utils.load_model(dest)
    assert rel_err(model(TEXT_IDS), theirs(TEXT_IDS)) < RTOL


@pytest.mark.oracle
@pytest.mark.parametrize("dequantize", [False, True])
def test_an_mlx_vlm_mixed_folder_converts(tmp_path, sources, dequantize):
    """`convert` takes mlx-vlm's mixed MoE folder as its source: written again (each layer at its bits) or
    dequantized, the result gives the source folder's logits and loads in mlx-vlm with them."""
    folder = mlx_vlm_convert(sources["moe"], tmp_path / "vlm", **QUANT["mixed_4_6"][1])
    dest = convert(folder, mlx_path=tmp_path / "out", dequantize=dequantize, progress=False)
    source, _ = mlx_gemma.load(folder)
    model, _ = mlx_gemma.load(dest)
    bits = layer_bits(model)
    assert (not bits) if dequantize else bits == layer_bits(source)
    ids, kw, theirs_kw = PROMPTS["image"]
    expected = source(ids, **kw)
    assert rel_err(model(ids, **kw), expected) < RTOL
    assert rel_err(mlx_vlm_model(dest)(ids, **theirs_kw).logits, expected) < RTOL


# ----- what a folder gets wrong (folders in mlx-vlm's layout, written by our converter) -------------------


@pytest.fixture(scope="module")
def written(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("written")
    return {quant: convert(sources["moe"], mlx_path=root / quant, progress=False, **QUANT[quant][0])
            for quant in ("float", "mixed_4_6")}


def test_our_folder_is_in_mlx_vlm_layout(written):
    """Without mlx-vlm at hand: the experts as switch_glu halves, per-layer settings under mlx-vlm's module paths
    (8-bit routers, 6-bit layers of the recipe), the global layers' shape and the vocabulary where mlx-vlm and
    mlx-lm read them; loaded back, each layer at its bits."""
    config = json.loads((written["mixed_4_6"] / "config.json").read_text())
    names = set(mx.load(str(written["mixed_4_6"] / "model.safetensors")))
    assert {f"model.language_model.layers.0.experts.switch_glu.{p}.{leaf}" for p in ("gate_proj", "up_proj", "down_proj")
            for leaf in ("weight", "scales", "biases")} <= names
    assert not [n for n in names if "gate_up_proj" in n]
    q = config["quantization"]
    assert q["language_model.model.layers.0.router.proj"] == {"group_size": 64, "bits": 8}
    assert q["language_model.model.layers.0.experts.switch_glu.down_proj"]["bits"] == 6
    assert not [k for k in q if k.startswith("model.") or "gate_up_proj" in k]
    assert config["text_config"]["global_head_dim"] == 64 and config["vocab_size"] == 512
    model, _ = mlx_gemma.load(written["mixed_4_6"])
    bits = layer_bits(model)
    assert bits["model.language_model.layers.0.experts.gate_up_proj"] == 4
    assert bits["model.language_model.layers.0.experts.down_proj"] == 6
    assert bits["model.language_model.layers.0.router.proj"] == 8


def broken(src: Path, dest: Path, config_edit=None, drop: str | None = None) -> Path:
    """A copy of folder `src` with its config edited and / or tensor `drop` gone (from the index too)."""
    shutil.copytree(src, dest)
    if config_edit:
        config = json.loads((dest / "config.json").read_text())
        config_edit(config)
        (dest / "config.json").write_text(json.dumps(config))
    if drop:
        weights = dict(mx.load(str(dest / "model.safetensors")))
        del weights[drop]
        mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})
        index = dest / "model.safetensors.index.json"
        if index.exists():
            table = json.loads(index.read_text())
            del table["weight_map"][drop]
            index.write_text(json.dumps(table))
    return dest


@pytest.mark.parametrize("drop", ["model.language_model.layers.1.experts.switch_glu.up_proj.scales",
                                  "model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"])
def test_a_missing_tensor_is_named(tmp_path, written, drop):
    folder = broken(written["mixed_4_6"], tmp_path / "f", drop=drop)
    with pytest.raises((WeightsMismatchError, ModelFileError)) as raised:
        mlx_gemma.load(folder)
    assert raised.value.path == str(folder)
    assert drop in raised.value.problem and "missing" in raised.value.problem


def test_a_quantization_entry_for_a_float_tensor_is_refused(tmp_path, written):
    def entry(config):
        config["quantization"] = {"group_size": 64, "bits": 4,
                                  "language_model.model.layers.0.mlp.gate_proj": {"group_size": 64, "bits": 4}}
    folder = broken(written["float"], tmp_path / "f", entry)
    with pytest.raises(WeightsMismatchError, match=r"model\.language_model\.layers\.0\.mlp\.gate_proj\.scales") \
            as raised:
        mlx_gemma.load(folder)
    assert raised.value.path == str(folder)


@pytest.mark.parametrize("key,settings,error,match", [
    ("language_model.model.layers.3.mlp.down_proj", {"group_size": 64, "bits": 9}, ConfigError,
     r"quantization\.model\.language_model\.layers\.3\.mlp\.down_proj\.bits must be one of"),
    ("language_model.model.layers.3.mlp.down_proj", {"group_size": 48, "bits": 4}, ConfigError, "group_size must be"),
    ("language_model.model.layers.3.mlp.down_proj", {"group_size": 64, "bits": 5}, WeightsMismatchError,
     r"wrong shape: model\.language_model\.layers\.3\.mlp\.down_proj\.weight"),
    ("mode", "nf4", ConfigError, r"quantization\.mode must be one of"),
])
def test_bits_we_cannot_run_are_refused(tmp_path, written, key, settings, error, match):
    """Settings outside what MLX runs name config.json and the key; settings that do not match the packed
    tensors (6 bits stored, 5 said) name the folder and the tensor."""
    folder = broken(written["mixed_4_6"], tmp_path / "f", lambda c: c["quantization"].update({key: settings}))
    stored = json.loads((written["mixed_4_6"] / "config.json").read_text())["quantization"]
    assert stored["language_model.model.layers.3.mlp.down_proj"]["bits"] == 6
    with pytest.raises(error, match=match) as raised:
        mlx_gemma.load(folder)
    assert raised.value.path in (str(folder), str(folder / "config.json"))


def test_gate_and_up_halves_that_differ_are_refused_naming_the_config(tmp_path, written):
    name = "language_model.model.layers.0.experts.switch_glu.gate_proj"
    folder = broken(written["mixed_4_6"], tmp_path / "f",
                    lambda c: c["quantization"].update({name: {"group_size": 64, "bits": 8}}))
    with pytest.raises(ConfigError, match="gate_proj and up_proj have different settings") as raised:
        mlx_gemma.load(folder)
    assert raised.value.path == str(folder / "config.json")
