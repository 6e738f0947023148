"""LoRA / QLoRA / DoRA layers, enable_lora, fuse, and adapter files.

References: PEFT's LoraLayer (on CPU torch) computes the same layers and a
whole adapted transformers model from the same arrays; mlx-lm reads the
adapter folders we write and we read the ones it writes.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma.tuner import lora
from mlx_gemma.errors import AdapterError, ModelFileError
from mlx_gemma.loading import load_model

from conftest import FIXTURES

TINY = FIXTURES / "tiny_gemma"
IDS = np.array([[2, 17, 40, 93, 5, 260, 11, 7, 301], [2, 8, 9, 77, 150, 3, 99, 42, 12]])


def assert_close(ours, reference, rtol=1e-5):
    """Agreement within rtol of the reference's largest magnitude."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    err, scale = np.abs(ours - reference).max(), np.abs(reference).max()
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} x {scale:.3g}"


def randomize_adapters(model, seed=0, scale=0.05):
    """Nonzero A, B (and DoRA magnitudes), so every adapter changes the output."""
    rng = np.random.default_rng(seed)
    for _, layer in lora.lora_layers(model):
        layer.lora_a = mx.array(rng.normal(0, 0.2, layer.lora_a.shape).astype(np.float32))
        layer.lora_b = mx.array(rng.normal(0, scale, layer.lora_b.shape).astype(np.float32))
        if "m" in layer:
            layer.m = layer.m * mx.array(rng.uniform(0.8, 1.2, layer.m.shape).astype(np.float32))
    mx.eval(model.parameters())


# --- single layers against PEFT -----------------------------------------------------------------


def peft_linear(weight, bias, a, b, alpha, rank, m=None):
    """PEFT's LoRA (or DoRA, with magnitudes m) around a torch Linear holding `weight`."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)

    holder = Holder()
    with torch.no_grad():
        holder.proj.weight.copy_(torch.tensor(weight))
        if bias is not None:
            holder.proj.bias.copy_(torch.tensor(bias))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0,
                             use_dora=m is not None)
    wrapped = peft.get_peft_model(holder, config)
    layer = wrapped.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(a.T))  # PEFT stores A as [r, in]
        layer.lora_B["default"].weight.copy_(torch.tensor(b.T))
        if m is not None:
            layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    return layer


@pytest.mark.oracle
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_layer_matches_peft(bias, dora):
    torch = pytest.importorskip("torch")
    mx.random.seed(0)
    base = nn.Linear(48, 40, bias=bias)
    layer = (lora.DoRALinear if dora else lora.LoRALinear)(base, rank=4, scale=8 / 4)
    randomize_adapters_layer(layer)
    x = np.random.default_rng(1).normal(size=(2, 5, 48)).astype(np.float32)
    ref = peft_linear(np.array(base.weight), np.array(base.bias) if bias else None, np.array(layer.lora_a),
                      np.array(layer.lora_b), alpha=8, rank=4, m=np.array(layer.m) if dora else None)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    assert_close(layer(mx.array(x)), expected)
    # Fused into one linear, the layer computes the same.
    assert_close(layer.fuse()(mx.array(x)), expected)


def randomize_adapters_layer(layer, seed=3):
    holder = nn.Module()
    holder.layer = layer
    randomize_adapters(holder, seed, scale=0.3)


@pytest.mark.oracle
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dora", [False, True])
def test_qlora_layer_matches_peft_on_the_dequantized_base(bits, dora):
    """QLoRA: the base stays quantized, the adapters are float; equal to LoRA on the base's dequantized weight."""
    torch = pytest.importorskip("torch")
    mx.random.seed(0)
    base = nn.QuantizedLinear.from_linear(nn.Linear(64, 32, bias=False), group_size=32, bits=bits)
    layer = (lora.DoRALinear if dora else lora.LoRALinear)(base, rank=4, scale=2.0)
    assert layer.lora_a.shape == (64, 4) and layer.lora_b.shape == (4, 32)
    randomize_adapters_layer(layer)
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    ref = peft_linear(np.array(lora.dense_weight(base)), None, np.array(layer.lora_a), np.array(layer.lora_b),
                      alpha=8, rank=4, m=np.array(layer.m) if dora else None)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    assert_close(layer(mx.array(x)), expected, rtol=1e-4)  # quantized matmul vs dense: float rounding only
    names = [k for k, _ in tree_flatten(layer.trainable_parameters())]
    assert sorted(names) == ["lora_a", "lora_b"] + (["m"] if dora else [])


# --- a whole model ---------------------------------------------------------------------------


@pytest.mark.oracle
def test_adapted_model_matches_peft_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = load_model(TINY)
    lora.enable_lora(model, rank=4, alpha=16, target_names=("q_proj", "v_proj", "down_proj"), num_layers=2)
    randomize_adapters(model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(TINY, attn_implementation="eager").eval()
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             layers_to_transform=[1, 2], lora_dropout=0.0)
    reference = peft.get_peft_model(reference, config)
    load_into_peft(reference, model)
    with torch.no_grad():
        expected = reference(torch.tensor(IDS)).logits.numpy()
    assert_close(model(mx.array(IDS)), expected, rtol=1e-4)


def load_into_peft(peft_model, model):
    """Copy our adapters into a PEFT model with the same targets."""
    import torch

    named = dict(peft_model.named_modules())
    with torch.no_grad():
        for path, layer in lora.lora_layers(model):
            target = named[f"base_model.model.{path}"]
            target.lora_A["default"].weight.copy_(torch.tensor(np.array(layer.lora_a).T))
            target.lora_B["default"].weight.copy_(torch.tensor(np.array(layer.lora_b).T))


def test_enable_lora_freezes_all_but_the_adapters():
    model = load_model(TINY)
    config = lora.enable_lora(model, rank=2, target_names=("q_proj", "gate_proj"), num_layers=2)
    trainable = sorted(k for k, _ in tree_flatten(model.trainable_parameters()))
    expected = sorted(f"model.layers.{i}.{key}.{leaf}" for i in (1, 2)
                      for key in ("self_attn.q_proj", "mlp.gate_proj") for leaf in ("lora_a", "lora_b"))
    assert trainable == expected
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "mlp.gate_proj"]
    assert config["num_layers"] == 2 and config["lora_parameters"]["scale"] == 20.0
    # B starts at zero: the adapted model is the base model.
    base = load_model(TINY)
    assert_close(model(mx.array(IDS)), base(mx.array(IDS)), rtol=0)


def test_enable_lora_defaults_to_query_and_value_in_every_block():
    model = load_model(TINY)
    config = lora.enable_lora(model)
    assert config["lora_parameters"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert sorted(p for p, _ in lora.lora_layers(model)) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_proj", "v_proj")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_names=("qkv",)), "no projection named 'qkv'"),
    (dict(num_layers=4), "num_layers must be between 1 and 3"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
    (dict(scale=1.0, alpha=2.0), "not both"),
])
def test_enable_lora_rejects_bad_settings(kwargs, message):
    with pytest.raises(AdapterError, match=message):
        lora.enable_lora(load_model(TINY), **kwargs)


def test_enable_twice_is_an_error():
    model = load_model(TINY)
    lora.enable_lora(model)
    with pytest.raises(AdapterError, match="already has an adapter"):
        lora.enable_lora(model)


# --- fusing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_fused_model_equals_base_plus_adapters(dora):
    model = load_model(TINY)
    lora.enable_lora(model, rank=4, target_names=lora.TARGETS, dora=dora)
    randomize_adapters(model)
    adapted = model(mx.array(IDS))
    lora.fuse(model)
    assert not lora.lora_layers(model)
    assert all(isinstance(m, nn.Linear) for p, m in model.named_modules() if p.endswith("_proj"))  # spread on a CPU
    assert_close(model(mx.array(IDS)), adapted)


def test_fusing_a_quantized_base():
    """Dequantized: exact.  Re-quantized: what MLX's quantizer makes of the float fused model."""
    def quantized():
        m = load_model(TINY)
        nn.quantize(m, group_size=32, bits=8, class_predicate=lambda p, mod: isinstance(mod, nn.Linear))
        lora.enable_lora(m, rank=4, scale=2.0, target_names=("q_proj", "v_proj", "down_proj"))
        randomize_adapters(m)
        return m

    model = quantized()
    adapted = model(mx.array(IDS))
    lora.fuse(model, dequantize=True)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    assert_close(model(mx.array(IDS)), adapted, rtol=1e-5)
    nn.quantize(model, group_size=32, bits=8, class_predicate=lambda p, mod: isinstance(mod, nn.Linear))
    requantized_by_hand = model(mx.array(IDS))

    model = quantized()
    lora.fuse(model)
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) and q.bits == 8 and q.group_size == 32
    assert_close(model(mx.array(IDS)), requantized_by_hand, rtol=1e-6)


# --- adapter files ---------------------------------------------------------------------------


def saved_adapter(tmp_path, **kwargs):
    model = load_model(TINY)
    config = lora.enable_lora(model, rank=4, num_layers=2, **kwargs)
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    return model, tmp_path / "adapter"


@pytest.mark.parametrize("dora", [False, True])
def test_save_and_load_round_trip(tmp_path, dora):
    model, folder = saved_adapter(tmp_path, dora=dora)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    loaded = lora.load_adapters(load_model(TINY), folder)
    assert_close(loaded(mx.array(IDS)), model(mx.array(IDS)), rtol=0)
    assert json.loads((folder / "adapter_config.json").read_text())["fine_tune_type"] == ("dora" if dora else "lora")


def test_adapter_for_another_model_is_refused(tmp_path):
    _, folder = saved_adapter(tmp_path)
    with pytest.raises(AdapterError, match="adapter_config.json.*another base model.*num_hidden_layers 3 \\(this model: 4\\)"):
        lora.load_adapters(load_model(FIXTURES / "tiny_gemma2"), folder)


def test_adapter_with_other_rank_is_refused(tmp_path):
    _, folder = saved_adapter(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 8
    del config["base_model"]  # as an mlx-lm adapter config would be: the shapes must catch it
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"adapters.safetensors.*does not fit.*lora_a has shape \(64, 4\)"):
        lora.load_adapters(load_model(TINY), folder)


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "adapter_config.json").unlink(), "adapter_config.json: missing"),
    (lambda f: (f / "adapters.safetensors").unlink(), "adapters.safetensors: missing"),
    (lambda f: (f / "adapter_config.json").write_text("{oops"), "not valid JSON"),
    (lambda f: (f / "adapter_config.json").write_text('{"fine_tune_type": "full", "num_layers": 2, '
                                                      '"lora_parameters": {"rank": 4, "scale": 1}}'), "'full'"),
    (lambda f: (f / "adapters.safetensors").write_bytes(b"\x10\x00"), "adapters.safetensors"),
    (lambda f: (f / "adapter_config.json").write_text('{"num_layers": 2, "lora_parameters": {"rank": "8", '
                                                      '"scale": 1}}'), "'lora_parameters.rank' must be an integer"),
    (lambda f: (f / "adapter_config.json").write_text('{"num_layers": 2, "lora_parameters": {"rank": 4, '
                                                      '"scale": 1, "keys": "q_proj"}}'), "'lora_parameters.keys' must be an array"),
    (lambda f: shutil.rmtree(f), "no such adapter folder"),
])
def test_broken_adapter_folders_name_the_file(tmp_path, damage, message):
    _, folder = saved_adapter(tmp_path)
    damage(folder)
    with pytest.raises(ModelFileError, match=message):  # AdapterError, or tensorfile's for a corrupt file
        lora.load_adapters(load_model(TINY), folder)


# --- mlx-lm interoperability -------------------------------------------------------------------


@pytest.mark.oracle
def test_mlx_lm_loads_our_adapters_and_we_load_its(tmp_path):
    pytest.importorskip("mlx_lm")
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.tuner.utils import load_adapters as lm_load_adapters
    from mlx_lm.utils import load as lm_load

    ours, folder = saved_adapter(tmp_path, target_names=("q_proj", "v_proj", "up_proj"))
    theirs, _ = lm_load(str(TINY))
    lm_load_adapters(theirs, str(folder))
    ours_params = lora.adapter_weights(ours)
    theirs_params = {k: v for k, v in tree_flatten(theirs.parameters()) if ".lora_" in k}
    assert ours_params.keys() == theirs_params.keys()
    for k, v in ours_params.items():
        assert mx.array_equal(v, theirs_params[k]), k
    # mlx-lm's Gemma 1 uses the exact GELU, transformers (and we) the tanh one: ~3e-4 apart.
    assert_close(theirs(mx.array(IDS)), ours(mx.array(IDS)), rtol=2e-3)

    # And the other way: an adapter mlx-lm made, with its own config spelling.
    theirs, _ = lm_load(str(TINY))
    theirs.freeze()
    linear_to_lora_layers(theirs, 2, {"rank": 2, "scale": 10.0, "dropout": 0.0, "keys": ["mlp.down_proj"]})
    randomize_adapters_mlx_lm(theirs)
    out = tmp_path / "from_mlx_lm"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(theirs.trainable_parameters())))
    (out / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 2, "scale": 10.0, "dropout": 0.0,
                                                                        "keys": ["mlp.down_proj"]}}))
    loaded = lora.load_adapters(load_model(TINY), out)
    assert_close(loaded(mx.array(IDS)), theirs(mx.array(IDS)), rtol=2e-3)


def randomize_adapters_mlx_lm(model):
    rng = np.random.default_rng(7)
    for _, m in model.named_modules():
        if "lora_b" in m:
            m.lora_b = mx.array(rng.normal(0, 0.1, m.lora_b.shape).astype(np.float32))


# --- using and fusing adapters: load(adapter_path=...), generate --adapter-path, python -m mlx_gemma.fuse ------


def test_load_with_adapter_path_gives_the_adapted_model_in_eval_mode(tmp_path):
    from mlx_gemma import load

    model, folder = saved_adapter(tmp_path, dropout=0.5)
    loaded, _ = load(TINY, adapter_path=folder)
    assert not loaded.training and not loaded.layers[-1].self_attn.q_proj.dropout.training
    model.eval()
    assert mx.array_equal(loaded(mx.array(IDS)), model(mx.array(IDS)))


def test_generate_cli_with_adapter_path(tmp_path, capsys):
    from mlx_gemma import load
    from mlx_gemma.generate import generate, main

    _, folder = saved_adapter(tmp_path)
    assert main(["--model", str(TINY), "--adapter-path", str(folder), "--prompt", "hello", "--max-tokens", "4",
                 "--no-chat"]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load(TINY, adapter_path=folder)
    assert printed.strip() == generate(model, tokenizer, "hello", max_tokens=4, chat=False).strip()
    assert main(["--model", str(TINY), "--adapter-path", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such adapter folder" in capsys.readouterr().err


def test_fuse_cli_writes_a_model_equal_to_base_plus_adapters(tmp_path):
    from mlx_gemma.fuse import main

    model, folder = saved_adapter(tmp_path, target_names=lora.TARGETS)
    assert main(["--model", str(TINY), "--adapter-path", str(folder), "--save-path", str(tmp_path / "fused")]) == 0
    fused = load_model(tmp_path / "fused")
    assert not lora.lora_layers(fused)
    assert_close(fused(mx.array(IDS)), model(mx.array(IDS)), rtol=1e-5)
    assert (tmp_path / "fused" / "tokenizer.model").is_file()
    assert main(["--model", str(TINY), "--adapter-path", str(folder), "--save-path", str(tmp_path / "fused")]) == 2


def test_fuse_keeps_the_chat_template_and_tokenizer_files(tmp_path):
    """The fused folder carries the base folder's side files byte for byte (issue 19: an instruct
    model's chat template and tokenizer.json would otherwise be lost in the fused copy)."""
    from mlx_gemma.fuse import fuse_model

    base = tmp_path / "base"
    shutil.copytree(TINY, base)
    side = {"chat_template.jinja": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
            "tokenizer_config.json": json.dumps({"add_bos_token": True, "model_max_length": 128})}
    for name, text in side.items():
        (base / name).write_text(text)
    _, folder = saved_adapter(tmp_path, target_names=("q_proj",))
    out = fuse_model(base, folder, tmp_path / "fused")
    for name, text in side.items():
        assert (out / name).read_text() == text


def test_fuse_cli_requantizes_a_quantized_base(tmp_path):
    from mlx_gemma.convert import convert
    from mlx_gemma.fuse import main

    base = convert(TINY, mlx_path=tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32, progress=False)
    model = load_model(base)
    config = lora.enable_lora(model, rank=4, target_names=("q_proj", "down_proj"))
    randomize_adapters(model)
    lora.save_adapters(tmp_path / "adapter", model, config)
    adapted = model(mx.array(IDS))

    assert main(["--model", str(base), "--adapter-path", str(tmp_path / "adapter"),
                 "--save-path", str(tmp_path / "fused")]) == 0
    fused = load_model(tmp_path / "fused")
    assert isinstance(fused.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["quantization"]["bits"] == 8
    assert_close(fused(mx.array(IDS)), lora.fuse(model)(mx.array(IDS)), rtol=1e-6)

    assert main(["--model", str(base), "--adapter-path", str(tmp_path / "adapter"),
                 "--save-path", str(tmp_path / "float"), "--dequantize"]) == 0
    floats = load_model(tmp_path / "float")
    assert "quantization" not in json.loads((tmp_path / "float" / "config.json").read_text())
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in floats.named_modules())
    assert_close(floats(mx.array(IDS)), adapted, rtol=1e-5)


_SAVE_FOREVER = """
import sys
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_gemma.tuner import lora
from mlx_gemma.loading import load_model
model = load_model(sys.argv[1])
config = lora.enable_lora(model, rank=4, num_layers=2)
step = 0
while True:
    step += 1
    params = [(name, mx.full(p.shape, float(step), p.dtype)) for name, p in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(params))  # every adapter array holds `step`
    lora.save_adapters(sys.argv[2], model, config)
    print(step, flush=True)
"""


@pytest.mark.parametrize("point", [
    # Each round writes adapters.safetensors, then adapter_config.json: hits 3 and 4 are round 2's.
    "atomic.before-temp#3", "atomic.written#3", "atomic.before-rename#3", "atomic.after-rename#3",
    "atomic.written#4", "atomic.before-rename#4",
])
def test_killed_adapter_save_leaves_the_previous_good_file(tmp_path, point):
    """SIGKILL at a named point of the second save (atomic.fault_point): the folder loads, and
    every adapter array holds one round's value (never a mix, never a torn file)."""
    import os
    import subprocess
    import sys

    folder = tmp_path / "adapter"
    done = subprocess.run([sys.executable, "-c", _SAVE_FOREVER, str(TINY), str(folder)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "MLX_GEMMA_FAULT_AT": point})
    assert done.returncode == -9 and done.stdout.split() == ["1"], done.stderr  # died there, after round 1
    model = lora.load_adapters(load_model(TINY), folder)
    values = {float(mx.max(p)) for _, p in tree_flatten(model.trainable_parameters())}
    mins = {float(mx.min(p)) for _, p in tree_flatten(model.trainable_parameters())}
    assert len(values) == 1 and values == mins and values.pop() in (1.0, 2.0), "a torn or mixed adapter file"


def test_full_disk_while_saving_adapters_keeps_the_previous_ones(tmp_path, monkeypatch):
    import errno

    model, folder = saved_adapter(tmp_path)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def full_disk(file, arrays, metadata=None):
        file.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    randomize_adapters(model, seed=7)
    with pytest.raises(ModelFileError, match="adapters.safetensors.*No space left"):
        lora.save_adapters(folder, model, lora.read_adapter_config(folder))
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


# --- fuzzing adapter folders ----------------------------------------------------------------------

from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings  # noqa: E402
from mlx_gemma.tensorfile import load_file, save_file  # noqa: E402
from test_loading import _json_values, mutated_bytes, mutated_file  # noqa: E402

_ADAPTERS: dict = {}
_ADAPTER_KEYS = ["fine_tune_type", "num_layers", "lora_parameters", "rank", "scale", "dropout", "keys", "base_model",
                 "hidden_size", "model_type", "num_hidden_layers", "head_dim"]
_adapter_values = _json_values | st.sampled_from(
    [0, -1, -2, 1, 2, 4, 8, 2**20, 2**62, 1e308, float("nan"), float("inf"), 0.999, 1.0, "lora", "dora", "full",
     ["q_proj"], ["self_attn.q_proj", "mlp.down_proj"], ["mlp"], ["q_proj", "q_proj"], [""], {}, {"hidden_size": 64}])


def fuzz_adapter(tmp_path_factory, dora: bool):
    """(folder, its original files) of a saved LoRA or DoRA adapter for the tiny Gemma, made once."""
    if dora not in _ADAPTERS:
        base = tmp_path_factory.mktemp("adapter")
        _, folder = saved_adapter(base, dora=dora, target_names=("q_proj", "down_proj"))
        _ADAPTERS[dora] = folder, {p.name: p.read_bytes() for p in folder.iterdir()}
    return _ADAPTERS[dora]


@st.composite
def mutated_tensors(draw, tensors: dict) -> dict:
    """Adapter tensors with one dropped, renamed, re-typed, re-shaped, or joined by a stranger."""
    tensors = dict(tensors)
    name = draw(st.sampled_from(sorted(tensors)))
    op = draw(st.sampled_from(["drop", "rename", "dtype", "shape", "add", "nan"]))
    if op == "drop":
        del tensors[name]
    elif op == "rename":
        tensors[draw(st.sampled_from([name.replace("layers.3", "layers.0"), name + "x", "lora_a", ""]))] = \
            tensors.pop(name)
    elif op == "dtype":
        tensors[name] = tensors[name].astype(draw(st.sampled_from([mx.int32, mx.uint8, mx.bool_, mx.float16])))
    elif op == "shape":
        a = tensors[name]
        tensors[name] = draw(st.sampled_from([a.T, a.reshape(-1), a[..., :1], mx.zeros((0,)), mx.zeros(())]))
    elif op == "add":
        tensors[name.replace("lora_", "lora_x")] = tensors[name]
    else:
        tensors[name] = mx.full(tensors[name].shape, float("nan"))
    return tensors


@fuzz_settings(80)
@given(dora=st.booleans(), which=st.sampled_from(["adapter_config.json", "adapters.safetensors"]), data=st.data())
# A NaN (or infinite) scale was accepted, giving NaN logits.
@example(dora=False, which="adapter_config.json", data=b'{"num_layers": 2, "lora_parameters": '
         b'{"rank": 4, "scale": NaN, "keys": ["self_attn.q_proj", "mlp.down_proj"]}}')
# An absurd scale was accepted, giving infinite logits.
@example(dora=False, which="adapter_config.json", data=b'{"num_layers": 2, "lora_parameters": '
         b'{"rank": 4, "scale": 1e300, "keys": ["self_attn.q_proj", "mlp.down_proj"]}}')
# A base_model that is not an object was an AttributeError.
@example(dora=False, which="adapter_config.json",
         data=b'{"num_layers": 2, "base_model": [1], "lora_parameters": {"rank": 4, "scale": 1}}')
# A rank past MLX's shape limits was a bare OverflowError building the adapters.
@example(dora=False, which="adapter_config.json",
         data=b'{"num_layers": 2, "lora_parameters": {"rank": 4611686018427387904, "scale": 1}}')
# A 5000-digit rank was a bare ValueError from Python's int conversion.
@example(dora=False, which="adapter_config.json", data=b'{"num_layers": 2, "lora_parameters": {"rank": 1'
         + b"0" * 5000 + b', "scale": 1}}')
# Deep nesting in adapter_config.json was a bare RecursionError.
@example(dora=False, which="adapter_config.json", data=b"[" * 100_000)
def test_fuzz_adapter_folders(tmp_path_factory, dora, which, data):
    """An adapter folder with a mutated adapter_config.json or adapters.safetensors either loads
    (every adapter of the model filled from the file, logits of the right shape) or is refused
    with our typed error naming the file, leaving the model's layers as they were."""
    folder, files = fuzz_adapter(tmp_path_factory, dora)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    if isinstance(data, bytes):
        (folder / which).write_bytes(data)
    elif which == "adapter_config.json":
        (folder / which).write_bytes(data.draw(mutated_file(json.loads(files[which]), _ADAPTER_KEYS, _adapter_values)))
    elif data.draw(st.booleans()):
        (folder / which).write_bytes(data.draw(mutated_bytes(files[which])))
    else:
        save_file(folder / which, data.draw(mutated_tensors(load_file(folder / which))))
    model = load_model(TINY)
    try:
        lora.load_adapters(model, folder)
    except ModelFileError as e:
        # A changed config can make the weights file the one that does not fit: either may be named.
        assert any(str(folder / name) in str(e) for name in files), e
        assert not lora.lora_layers(model), "a refused adapter must not stay half-applied"
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    loaded = load_file(folder / "adapters.safetensors")
    assert set(lora.adapter_weights(model)) == set(loaded)
    assert model(mx.array(IDS)).shape == (*IDS.shape, model.args.vocab_size)
