"""ShieldGemma 2 against transformers' ShieldGemma2ForImageClassification and ShieldGemma2Processor.

The references come from tests/fixtures/make_tiny_shieldgemma2.py (transformers 5.25, fp32, eager):
the tiny Gemma 3 vision-language shapes with Yes/No ids in the config, the converter's chat
template and the published policies saved with the processor; two images (one wide, one tall)
against the three default policies (a left-padded batch of 6), and one image against a default
and a custom policy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from mlx.utils import tree_flatten
from PIL import Image
from safetensors.numpy import load_file, save_file

import mlx_gemma
from mlx_gemma.errors import ConfigError, ImageError
from mlx_gemma.shieldgemma2 import CHAT_TEMPLATE, DEFAULT_POLICIES, PolicyError, ShieldGemma2, main, policy_prompt
from mlx_gemma.vision import gemma3_prompt_ids, preprocess_images

FOLDER = FIXTURES / "tiny_shieldgemma2"
CUSTOM = {"ip": "No IP: The image shall not reproduce trademarks."}  # as the fixture script's
ATOL = 1e-5


@pytest.fixture(scope="module")
def shield():
    return ShieldGemma2.load(FOLDER), dict(np.load(FOLDER / "reference.npz"))


def test_the_config_is_read_as_shieldgemma2config(shield):
    model = shield[0].model
    assert model.model_type == "shieldgemma2"
    assert (model.args.yes_token_index, model.args.no_token_index) == (103, 278)
    assert model.args.tie_word_embeddings  # False at the top, True in text_config: tied, as the reference
    assert shield[0].policy_definitions == DEFAULT_POLICIES  # the processor_config.json's, equal to the defaults


def test_probabilities_equal_transformers_for_a_batch_of_policies(shield):
    shield, ref = shield
    out = shield([ref["image0"], ref["image1"]])
    assert out.policies == ["dangerous", "sexual", "violence"]
    np.testing.assert_allclose(out.probabilities, ref["default_probabilities"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.logits, ref["default_logits"], atol=ATOL, rtol=0)
    assert out.yes.shape == (2, 3) and np.array_equal(out.yes.reshape(-1), out.probabilities[:, 0])


def test_custom_policies_equal_transformers(shield):
    shield, ref = shield
    out = shield(ref["image1"], policies=["violence", "ip"], custom_policies=CUSTOM)
    assert out.policies == ["violence", "ip"]
    np.testing.assert_allclose(out.probabilities, ref["custom_probabilities"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("case,image,policies", [("default", 0, None), ("default", 1, None),
                                                 ("custom", 1, ["violence", "ip"])])
def test_prompt_ids_and_pixels_equal_the_processor(shield, case, image, policies):
    shield, ref = shield
    definitions = {**DEFAULT_POLICIES, **CUSTOM}
    names = policies or list(DEFAULT_POLICIES)
    first = image * len(names) if case == "default" else 0
    spec = shield.model.image_input
    for i, name in enumerate(names):
        row = gemma3_prompt_ids(shield.tokenizer, policy_prompt(definitions[name]), 1, spec)
        real = ref[f"{case}_attention_mask"][first + i].astype(bool)
        assert row == ref[f"{case}_input_ids"][first + i][real].tolist()
    pixels = preprocess_images([ref[f"image{image}"]], spec.image_size, "bilinear")
    expected = ref[f"{case}_pixel_values"][first].transpose(1, 2, 0)
    np.testing.assert_allclose(np.array(pixels[0]), expected, atol=1e-6)


def test_cli_prints_each_image_and_policy(shield, tmp_path, capsys):
    _, ref = shield
    path = tmp_path / "tall.png"
    Image.fromarray(ref["image1"]).save(path)  # lossless: the reference's pixels
    argv = ["--model", str(FOLDER), "--image", str(path), "--policy", "violence", "--policy", "ip",
            "--custom-policy", f"ip={CUSTOM['ip']}"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:2] for line in lines] == [[str(path), "violence"], [str(path), "ip"]]
    printed = [float(line.split("P(Yes)=")[1]) for line in lines]
    np.testing.assert_allclose(printed, ref["custom_probabilities"][:, 0], atol=1e-6)


# ----- bad input ---------------------------------------------------------------------------


def test_unknown_policies_and_bad_definitions(shield):
    shield, ref = shield
    with pytest.raises(PolicyError, match="unknown policies \\['ip'\\]"):
        shield(ref["image0"], policies=["ip"])
    with pytest.raises(PolicyError, match="non-empty"):
        shield(ref["image0"], custom_policies={"ip": ""})
    with pytest.raises(PolicyError, match="no policies"):
        shield(ref["image0"], policies=[])


def test_bad_images(shield, tmp_path):
    shield, _ = shield
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError, match="bad.png"):
        shield(bad)
    with pytest.raises(ImageError, match="no such image"):
        shield(tmp_path / "missing.jpg")


def test_cli_errors_are_one_line_and_exit_2(shield, tmp_path, capsys):
    _, ref = shield
    path = tmp_path / "a.png"
    Image.fromarray(ref["image0"]).save(path)
    for argv, message in [
        (["--image", str(path), "--policy", "nope"], "unknown policies"),
        (["--image", str(tmp_path / "missing.png")], "no such image"),
        (["--image", str(path), "--custom-policy", "oops"], "NAME=DEFINITION"),
    ]:
        assert main(["--model", str(FOLDER), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_gemma3_model_is_refused():
    model, tokenizer = mlx_gemma.load(FIXTURES / "tiny_gemma3_vlm")
    with pytest.raises(ConfigError, match="not a ShieldGemma 2 model"):
        ShieldGemma2(model, tokenizer)


def test_config_errors(tmp_path):
    folder = tmp_path / "shield"
    shutil.copytree(FOLDER, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "yes_token_index": 512}))
    with pytest.raises(ConfigError, match="yes_token_index must be a token id below vocab_size 512"):
        mlx_gemma.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    processor = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**processor, "policy_definitions": {"x": 3}}))
    with pytest.raises(ConfigError, match="processor_config.json: policy_definitions must map"):
        ShieldGemma2.load(folder)


def test_another_chat_template_is_warned_of(tmp_path):
    folder = tmp_path / "shield"
    shutil.copytree(FOLDER, folder)
    template = (folder / "chat_template.jinja").read_text()
    assert template.strip() == CHAT_TEMPLATE.strip()  # the fixture's, saved by transformers' processor
    (folder / "chat_template.jinja").write_text(template.replace("policy expert", "careful policy expert"))
    with pytest.warns(UserWarning, match="chat template differs from ShieldGemma 2's published one"):
        ShieldGemma2.load(folder)


def test_weights_in_every_layout_load_alike(shield, tmp_path):
    """transformers 5.25's save (model.model.language_model.model.*), the hub's 4.50 layout
    (model.language_model.model.*, model.vision_tower.vision_model.*) and ours give one model."""
    shield, ref = shield
    weights = load_file(FOLDER / "model.safetensors")
    renames = [("model.model.language_model.model.", "model.language_model.model."),
               ("model.model.vision_tower.", "model.vision_tower.vision_model."),
               ("model.model.multi_modal_projector.", "model.multi_modal_projector.")]
    hub = {}
    for k, v in weights.items():
        for old, new in renames:
            k = k.replace(old, new)
        hub[k] = v
    ours = {k: np.ascontiguousarray(v) for k, v in tree_flatten(shield.model.parameters())}
    expected = shield(ref["image0"]).logits
    for name, layout in (("hub", hub), ("ours", ours)):
        assert layout.keys() != weights.keys()
        folder = tmp_path / name
        shutil.copytree(FOLDER, folder)
        save_file(layout, folder / "model.safetensors")
        assert np.array_equal(ShieldGemma2.load(folder)(ref["image0"]).logits, expected)
