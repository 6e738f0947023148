"""Prompt caches: reuse across calls (same tokens as a fresh run, only new tokens fed), trimming,
save/load with validation, and the cache_prompt -> generate --prompt-cache-file flow.

The reference for every token sequence is a fresh run without a cache (whose
greedy tokens test_generate checks against transformers).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import mlx.core as mx

from mlx_gemma.errors import GenerationError, ModelFileError, PromptCacheError
from mlx_gemma.generate import generate, stream_generate
from mlx_gemma.loading import load
from mlx_gemma.prompt_cache import (
    PromptCache,
    continuation_ids,
    load_prompt_cache,
    open_turn_ids,
    save_prompt_cache,
)
from mlx_gemma.tensorfile import save_file

from conftest import FIXTURES
from test_kv_cache import twin

_loaded: dict = {}


def tiny(name):
    if name not in _loaded:
        _loaded[name] = load(FIXTURES / f"tiny_{name}")
    return _loaded[name]


class Counting:
    """The model, counting the token positions fed to its decoder stack."""

    def __init__(self, model):
        self._model, self.fed = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def model(self, ids, cache=None, **kwargs):
        self.fed += ids.shape[1]
        return self._model.model(ids, cache=cache, **kwargs)


def tokens(model, tok, ids, **kwargs):
    return [r.token for r in stream_generate(model, tok, ids, **kwargs)]


def words(tok, text):
    return tok.encode(text, add_bos=False)


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_second_call_feeds_only_new_tokens_and_equals_a_fresh_run(name):
    model, tok = tiny(name)
    counting, pc = Counting(model), PromptCache(model)
    first = tok.encode("Once upon a time there was", add_bos=True)
    reply = tokens(counting, tok, first, max_tokens=10, prompt_cache=pc)
    assert reply == tokens(model, tok, first, max_tokens=10)
    # The loop runs a step ahead: all but the last generated token are in the cache.
    assert pc.offset == len(first) + 9 and pc.tokens == (first + reply)[:pc.offset]
    second = first + reply + words(tok, " and then a dragon came along to")  # past both windows (6, 5)
    counting.fed = 0
    responses = list(stream_generate(counting, tok, second, max_tokens=10, prompt_cache=pc))
    assert [r.token for r in responses] == tokens(model, tok, second, max_tokens=10)
    assert counting.fed == len(second) - (len(first) + 9) + 9  # the new prompt tokens, then 9 decode steps
    assert responses[0].prompt_tokens == len(second) - (len(first) + 9)


def test_a_changed_prompt_trims_back_to_the_common_prefix():
    model, tok = tiny("gemma")  # global layers only: any prefix can be kept
    counting, pc = Counting(model), PromptCache(model)
    first = tok.encode("The quick brown fox jumps over", add_bos=True)
    tokens(counting, tok, first, max_tokens=4, prompt_cache=pc)
    edited = first[:5] + words(tok, " slow red cat")
    counting.fed = 0
    assert tokens(counting, tok, edited, max_tokens=4, prompt_cache=pc) == tokens(model, tok, edited, max_tokens=4)
    assert counting.fed == len(edited) - 5 + 3
    # The same prompt again: only its last token is fed (its logits start the reply).
    counting.fed = 0
    assert tokens(counting, tok, edited, max_tokens=1, prompt_cache=pc) == tokens(model, tok, edited, max_tokens=1)
    assert counting.fed == 1


def test_a_wrapped_window_cannot_go_back_so_everything_is_recomputed():
    model, tok = tiny("gemma3")
    counting, pc = Counting(model), PromptCache(model)
    first = tok.encode("A long enough prompt to wrap the window", add_bos=True)
    tokens(counting, tok, first, max_tokens=3, prompt_cache=pc)
    edited = first[:-3] + words(tok, " twice")
    counting.fed = 0
    assert tokens(counting, tok, edited, max_tokens=3, prompt_cache=pc) == tokens(model, tok, edited, max_tokens=3)
    assert counting.fed == len(edited) + 2


def test_prompt_cache_with_its_own_options():
    model, tok = tiny("gemma3")
    pc = PromptCache(model, max_kv_size=8)
    ids = tok.encode("Capped caches also carry over between calls", add_bos=True)
    reply = tokens(model, tok, ids, max_tokens=6, prompt_cache=pc)
    assert reply == tokens(model, tok, ids, max_tokens=6, max_kv_size=8)
    more = ids + reply + words(tok, " yes")
    assert tokens(model, tok, more, max_tokens=6, prompt_cache=pc) == tokens(model, tok, more, max_tokens=6,
                                                                              max_kv_size=8)
    with pytest.raises(GenerationError, match="cache options"):
        stream_generate(model, tok, more, prompt_cache=pc, kv_bits=8)


def test_a_cache_for_another_model_is_refused():
    with pytest.raises(PromptCacheError, match="another model.*num_layers"):
        stream_generate(tiny("gemma3")[0], tiny("gemma3")[1], "Hi", prompt_cache=PromptCache(tiny("gemma2")[0]))


# ----- files --------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"max_kv_size": 9}])
def test_save_and_load_round_trip(tmp_path, options):
    model, tok = tiny("gemma3")
    pc = PromptCache(model, **options)
    ids = tok.encode("Save me and load me again, please", add_bos=True)
    reply = tokens(model, tok, ids, max_tokens=5, prompt_cache=pc)
    path = tmp_path / "c.safetensors"
    save_prompt_cache(path, pc, {"note": "hello"})
    loaded = load_prompt_cache(path, model)
    assert loaded.tokens == pc.tokens and loaded.metadata == {"note": "hello"} and loaded.options == pc.options
    more = ids + reply + words(tok, " again")
    assert tokens(model, tok, more, max_tokens=5, prompt_cache=loaded) == tokens(model, tok, more, max_tokens=5,
                                                                                  **options)


def test_save_and_load_a_quantized_cache(tmp_path):
    model, _ = twin("gemma2")
    ids = mx.random.randint(3, 500, (30,)).tolist()
    pc = PromptCache(model, kv_bits=4, kv_group_size=32, quantized_kv_start=10)
    pc.extend(model, ids, step_size=7)
    path = tmp_path / "q.safetensors"
    save_prompt_cache(path, pc)
    loaded = load_prompt_cache(path, model)
    assert all(c.quantized and len(c.keys) == 3 for c in loaded.caches)
    nxt = mx.array([[7, 8, 9]])
    assert np.array_equal(np.array(model(nxt, cache=loaded.caches)), np.array(model(nxt, cache=pc.caches)))


def test_files_that_are_not_ours_or_do_not_fit_are_refused(tmp_path):
    model, tok = tiny("gemma3")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelFileError, match="garbage.safetensors"):
        load_prompt_cache(garbage)
    weights = tmp_path / "weights.safetensors"
    save_file(weights, {"x": mx.zeros((2,))})
    with pytest.raises(PromptCacheError, match="weights.safetensors: not an mlx_gemma prompt cache"):
        load_prompt_cache(weights)

    pc = PromptCache(model)
    pc.extend(model, tok.encode("some words to cache", add_bos=True))
    good = tmp_path / "good.safetensors"
    save_prompt_cache(good, pc)
    with pytest.raises(PromptCacheError, match="good.safetensors: the prompt cache was made for another model"):
        load_prompt_cache(good, tiny("gemma2")[0])

    arrays, meta = mx.load(str(good), return_metadata=True)
    for name, change in [
        ("shape", lambda a, m: a.update({"layers.0.keys.0": a["layers.0.keys.0"][:, :, :2]})),
        ("extra", lambda a, m: a.update({"surprise": mx.zeros((1,))})),
        ("tokens", lambda a, m: a.update({"tokens": a["tokens"][:-1]})),
        ("layers", lambda a, m: m.update({"layers": json.dumps(json.loads(m["layers"])[:-1])})),
        ("json", lambda a, m: m.update({"options": "{"})),
        ("version", lambda a, m: m.update({"version": "99"})),
    ]:
        a, m = dict(arrays), dict(meta)
        change(a, m)
        bad = tmp_path / f"bad_{name}.safetensors"
        save_file(bad, a, m)
        with pytest.raises(PromptCacheError, match=f"bad_{name}.safetensors"):
            load_prompt_cache(bad, model)


def test_save_is_atomic_and_checks_its_input(tmp_path):
    model, _ = tiny("gemma3")
    with pytest.raises(ModelFileError, match="no_such_dir"):
        save_prompt_cache(tmp_path / "no_such_dir" / "c.safetensors", PromptCache(model))
    with pytest.raises(GenerationError, match="PromptCache"):
        save_prompt_cache(tmp_path / "c.safetensors", model.make_cache())
    with pytest.raises(GenerationError, match="strings"):
        save_prompt_cache(tmp_path / "c.safetensors", PromptCache(model), {"n": 1})
    assert list(tmp_path.iterdir()) == []


# ----- the command-line flow ------------------------------------------------------------


def run_module(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, cwd=FIXTURES.parents[1])


@pytest.mark.parametrize("chat", [True, False])
def test_cache_prompt_then_generate_from_the_file(tmp_path, chat):
    model, tok = tiny("gemma3")
    folder, path = str(FIXTURES / "tiny_gemma3"), str(tmp_path / "doc.safetensors")
    flag = "--chat" if chat else "--no-chat"
    done = run_module("mlx_gemma.cache_prompt", "--model", folder, "--prompt", "A document about cats.",
                      "--prompt-cache-file", path, flag, "--max-kv-size", "12")
    assert done.returncode == 0, done.stderr
    cached = open_turn_ids(tok, "A document about cats.") if chat else tok.encode("A document about cats.")
    loaded = load_prompt_cache(path, model)
    assert loaded.tokens == cached and loaded.metadata == {"chat": str(chat).lower(), "model": folder}
    done = run_module("mlx_gemma.generate", "--prompt-cache-file", path, "--prompt", " Summarize.",
                      "--max-tokens", "6")
    assert done.returncode == 0, done.stderr
    full = cached + continuation_ids(tok, " Summarize.", chat)
    assert done.stdout == generate(model, tok, full, max_tokens=6, max_kv_size=12) + "\n"
    assert f"Prompt: {len(full) - len(cached)} tokens" in done.stderr


def test_open_turn_and_continuation_make_the_chat_template():
    _, tok = tiny("gemma3")
    whole = tok.apply_chat_template([{"role": "system", "content": "Be kind."},
                                     {"role": "user", "content": "Tell me more"}], tokenize=True)
    assert open_turn_ids(tok, "Tell me", "Be kind.") + continuation_ids(tok, " more", True) == whole


def test_generate_with_a_cache_file_refuses_new_cache_options(tmp_path):
    done = run_module("mlx_gemma.generate", "--prompt-cache-file", str(tmp_path / "x.safetensors"),
                      "--kv-bits", "8")
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "fixed" in done.stderr


# ----- fuzzing prompt-cache files ---------------------------------------------------------

from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings  # noqa: E402
from mlx_gemma.tensorfile import load_file_with_metadata  # noqa: E402
from test_loading import _json_values, mutated_bytes, mutated_json  # noqa: E402
from test_tuner_lora import mutated_tensors  # noqa: E402

_CACHE_FILES: dict = {}
_CACHE_KINDS = ["plain", "rotating", "quantized"]
_META_JSON = ("options", "model", "layers", "metadata")
_cache_values = _json_values | st.sampled_from(
    [0, 1, 2, 4, 8, 9, 32, 64, 2**31, 2**62, -1, True, None, float("nan"), "gemma3_text", [None], [4096, None],
     {"offset": 3, "quantized": False, "rotating": False}, {"kv_bits": 4}, {"kv_group_size": 0}])


def fuzz_cache_model(kind):
    return twin("gemma2")[0] if kind == "quantized" else tiny("gemma3")[0]


def fuzz_cache_file(tmp_path_factory, kind):
    """(arrays, metadata) of a saved prompt cache: plain, rotating (max_kv_size) or quantized; made once."""
    if kind not in _CACHE_FILES:
        model = fuzz_cache_model(kind)
        options = {"plain": {}, "rotating": {"max_kv_size": 9},
                   "quantized": {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 4}}[kind]
        pc = PromptCache(model, **options)
        pc.extend(model, list(range(3, 15)), step_size=5)
        path = tmp_path_factory.mktemp("cache") / f"{kind}.safetensors"
        save_prompt_cache(path, pc, {"note": "fuzz"})
        _CACHE_FILES[kind] = (path, path.read_bytes(), *load_file_with_metadata(path))
    return _CACHE_FILES[kind]


@fuzz_settings(100)
@given(kind=st.sampled_from(_CACHE_KINDS), data=st.data())
# Deep nesting inside a metadata JSON string was a bare RecursionError.
@example(kind="plain", data=("model", "[" * 100_000))
# A 5000-digit integer in the metadata JSON was a bare ValueError from Python's int conversion.
@example(kind="plain", data=("options", '{"quantized_kv_start": 1' + "0" * 5000 + "}"))
def test_fuzz_prompt_cache_files(tmp_path_factory, kind, data):
    """A prompt-cache file with mutated metadata (its JSON values, anywhere inside), mutated
    arrays, or damaged bytes either loads for its model (and the model decodes on from it)
    or is refused with our typed error naming the file."""
    path, raw, arrays, meta = fuzz_cache_file(tmp_path_factory, kind)
    target = path.with_name("fuzzed.safetensors")
    if isinstance(data, tuple):
        save_file(target, arrays, {**meta, data[0]: data[1]})
    else:
        how = data.draw(st.sampled_from(["json", "json", "meta", "arrays", "bytes"]))
        if how == "json":
            key = data.draw(st.sampled_from(_META_JSON))
            value = data.draw(mutated_json(json.loads(meta[key]), ["offset", "quantized", "rotating", "windows"],
                                           _cache_values))
            save_file(target, arrays, {**meta, key: json.dumps(value)})
        elif how == "meta":
            key = data.draw(st.sampled_from([*meta, "x"]))
            changed = dict(meta)
            if data.draw(st.booleans()):
                changed.pop(key, None)
            else:
                changed[key] = data.draw(st.text(max_size=20) | st.sampled_from(["1", "{}", "[]", "null", "NaN"]))
            save_file(target, arrays, changed)
        elif how == "arrays":
            save_file(target, data.draw(mutated_tensors(arrays)), meta)
        else:
            target.write_bytes(data.draw(mutated_bytes(raw)))
    model = fuzz_cache_model(kind)
    try:
        pc = load_prompt_cache(target, model)
    except ModelFileError as e:
        assert str(target) in str(e), e
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    assert pc.offset == len(pc.tokens) and all(c.offset == pc.offset for c in pc.caches)
    assert model(mx.array([[5]]), cache=pc.caches).shape == (1, 1, model.args.vocab_size)
