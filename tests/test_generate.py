"""Generation: greedy parity with transformers, batching, stopping, limits, errors and the CLI.

Uses the tiny fixture models (random weights, so the text is gibberish, but
transformers' greedy ids are in reference.npz) and a scripted stand-in model
where a test needs to know exactly which tokens come out.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn

import mlx_gemma
from mlx_gemma import engine
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import (
    batch_generate,
    generate,
    generate_step,
    looks_instruct,
    stream_batch_generate,
    stream_generate,
)
from mlx_gemma.loading import load
from mlx_gemma.samplers import make_logits_processors, make_sampler

from conftest import FIXTURES, TINY_MODELS

# The CLI module (`mlx_gemma.generate` the attribute is the function, as in mlx-lm).
gen = importlib.import_module("mlx_gemma.generate")

_loaded: dict[str, tuple] = {}


def tiny(name: str):
    """(model, tokenizer, reference) for tests/fixtures/tiny_<name>, loaded once."""
    if name not in _loaded:
        folder = FIXTURES / f"tiny_{name}"
        _loaded[name] = (*load(folder), dict(np.load(folder / "reference.npz")))
    return _loaded[name]


class Scripted:
    """A stand-in model that emits `script` in order, whatever it is fed.

    It keeps the part of the model contract (mlx_gemma.models.GemmaModel) that generation uses.
    """

    prefix_lm = False  # prompts may be prefilled in chunks
    image_input = None  # text only
    model_type = "scripted"
    path = None

    def __init__(self, script, vocab_size=400, context=64):
        self.args = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=context,
                                    attn_logit_softcapping=None)
        self.script, self.step = list(script), 0

    def make_cache(self, left_padding=None, options=None):
        return [SimpleNamespace(offset=0, state=[])]

    def model(self, ids, cache=None):
        cache[0].offset += ids.shape[1]
        return mx.zeros((ids.shape[0], ids.shape[1], 1))

    def logits(self, hidden):
        token = self.script[min(self.step, len(self.script) - 1)]
        self.step += 1
        row = mx.where(mx.arange(self.args.vocab_size) == token, 10.0, -10.0)
        return mx.broadcast_to(row, (hidden.shape[0], self.args.vocab_size)) + hidden[..., :1]


def run(model, tokenizer, prompt, **kwargs):
    responses = list(stream_generate(model, tokenizer, prompt, **kwargs))
    return [r.token for r in responses], "".join(r.text for r in responses), responses


# ----- greedy parity and the decode loop ------------------------------------------------


@pytest.mark.parametrize("name", TINY_MODELS)
def test_greedy_matches_transformers(name):
    model, tok, ref = tiny(name)
    prompt = ref["greedy_prompt"].tolist()
    tokens, _, responses = run(model, tok, prompt, max_tokens=len(ref["greedy_ids"]))
    assert tokens == ref["greedy_ids"].tolist()
    assert responses[-1].finish_reason == "length"
    assert all(r.finish_reason is None for r in responses[:-1])
    stepped = [ids[0] for ids, _ in generate_step(model, mx.array(prompt), max_tokens=len(tokens))]
    assert stepped == tokens


def test_chunked_prefill_gives_the_same_tokens():
    model, tok, ref = tiny("gemma2")
    prompt = ref["input_ids"][0].tolist()  # 14 tokens, over the window of 6
    whole = [ids for ids, _ in generate_step(model, prompt, max_tokens=6)]
    chunked = [ids for ids, _ in generate_step(model, prompt, max_tokens=6, prefill_step_size=4)]
    assert chunked == whole


def test_response_fields_and_logprobs():
    model, tok, ref = tiny("gemma3")
    responses = list(stream_generate(model, tok, ref["greedy_prompt"].tolist(), max_tokens=3))
    r = responses[-1]
    assert (r.prompt_tokens, r.generation_tokens) == (8, 3)
    assert r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory >= 0
    assert r.logprobs.shape == (model.args.vocab_size,)
    assert abs(float(mx.logsumexp(r.logprobs))) < 1e-4
    # Greedy leaves the log-softmax lazy: read after the loop, every step's is still its own.
    assert [int(mx.argmax(x.logprobs)) for x in responses] == [x.token for x in responses]


def test_stream_segments_join_to_the_full_decode():
    model, tok, _ = tiny("gemma3")
    tokens, text, responses = run(model, tok, "Hello world, this is", max_tokens=40)
    assert len(responses) == 40 and text == generate(model, tok, "Hello world, this is", max_tokens=40)
    # Ids past the tokenizer's pieces (the fixture's embedding is larger) have no text.
    assert text == tok.decode([t for t in tokens if t < tok.vocab_size])


def test_chat_messages_use_the_template():
    model, tok, _ = tiny("gemma3")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    from_messages, _, responses = run(model, tok, messages, max_tokens=4)
    assert responses[0].prompt_tokens == len(expected)
    assert from_messages == run(model, tok, expected, max_tokens=4)[0]
    wrapped = run(model, tok, "Hi there", max_tokens=4, chat=True, system="Be brief.")[0]
    assert wrapped == from_messages


def test_seeded_generation_repeats():
    model, tok, ref = tiny("gemma3")
    prompt = ref["greedy_prompt"].tolist()

    def sample(seed):
        return run(model, tok, prompt, max_tokens=12, sampler=make_sampler(temp=1.5, seed=seed))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_processors_see_prompt_then_generated_ids_with_pads_marked():
    model, tok, _ = tiny("gemma3")
    seen = []

    def spy(tokens, logits):
        seen.append(np.array(tokens).tolist())
        return logits

    prompts = [[2, 50, 60, 70], [2, 80]]
    out = list(stream_batch_generate(model, tok, prompts, max_tokens=3, logits_processors=[spy]))
    ids = [[step[b].token for step in out] for b in range(2)]
    assert seen[0] == [[2, 50, 60, 70], [-1, -1, 2, 80]]
    assert seen[2] == [[2, 50, 60, 70] + ids[0][:2], [-1, -1, 2, 80] + ids[1][:2]]


def test_repetition_penalty_changes_greedy_choice():
    model, tok, ref = tiny("gemma3")  # its greedy run repeats token 11
    prompt = ref["greedy_prompt"].tolist()
    plain = run(model, tok, prompt, max_tokens=10)[0]
    penalised = run(model, tok, prompt, max_tokens=10,
                    logits_processors=make_logits_processors(repetition_penalty=100.0))[0]
    assert len(set(plain)) < len(plain) and penalised != plain
    assert not set(penalised) & set(prompt)


# ----- batching -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_batched_greedy_equals_each_prompt_alone(name):
    model, tok, ref = tiny(name)
    prompts = [ref["input_ids"][0][:8].tolist(), ref["input_ids"][1][:13].tolist(), ref["greedy_prompt"].tolist()]
    steps = list(stream_batch_generate(model, tok, prompts, max_tokens=10))
    for b, prompt in enumerate(prompts):
        alone = run(model, tok, prompt, max_tokens=10)[0]
        assert [s[b].token for s in steps if s[b] is not None] == alone, f"row {b}"


def test_default_prefill_chunks_count_the_whole_batch(monkeypatch):
    """A batch of B rows prefills (the device's step) // B positions per call; its rows still equal each
    prompt alone (12 tokens for 3 rows: 4-position chunks across the padded prompts)."""
    model, tok, ref = tiny("gemma3")
    step = engine.CPU_PREFILL_STEP_SIZE if mx.default_device() == mx.cpu else engine.PREFILL_STEP_SIZE
    assert engine.default_prefill_step(model, 4) == step // 4
    gemma2, _, _ = tiny("gemma2")
    if mx.default_device() != mx.cpu:
        assert engine.default_prefill_step(gemma2, 2) == engine.SOFTCAP_PREFILL_STEP_SIZE // 2
    else:  # quantized weights are dequantized once per chunk: longer chunks
        quantized = load(FIXTURES / "tiny_gemma2")[0]  # a fresh copy: tiny() shares its models
        nn.quantize(quantized, group_size=32, bits=4, class_predicate=lambda _, m: isinstance(m, nn.Linear))
        assert engine.default_prefill_step(quantized, 2) == engine.CPU_QUANTIZED_PREFILL_STEP_SIZE // 2
    monkeypatch.setattr(engine, "PREFILL_STEP_SIZE", 12)
    monkeypatch.setattr(engine, "CPU_PREFILL_STEP_SIZE", 12)
    calls = []
    forward = model.model.__call__
    monkeypatch.setattr(type(model.model), "__call__", lambda self, x, **kw: calls.append(x.shape) or forward(x, **kw))
    prompts = [ref["input_ids"][0][:8].tolist(), ref["input_ids"][1][:13].tolist(), ref["greedy_prompt"].tolist()]
    steps = list(stream_batch_generate(model, tok, prompts, max_tokens=6))
    assert calls[0] == (3, 4)  # the first prefill call
    monkeypatch.undo()
    for b, prompt in enumerate(prompts):
        assert [s[b].token for s in steps if s[b] is not None] == run(model, tok, prompt, max_tokens=6)[0], f"row {b}"


def test_batch_generate_texts_and_independent_stops():
    model, tok, ref = tiny("gemma3")
    prompts = ["Hello world, this is", "Hi", ref["greedy_prompt"].tolist()]
    # Row 2 stops early on its 3rd greedy id; the others run to max_tokens.
    stop = int(ref["greedy_ids"][2])
    texts = batch_generate(model, tok, prompts, max_tokens=8, stop_token_ids=[stop])
    for prompt, text in zip(prompts, texts):
        assert text == generate(model, tok, prompt, max_tokens=8, stop_token_ids=[stop])
    steps = list(stream_batch_generate(model, tok, prompts, max_tokens=8, stop_token_ids=[stop]))
    assert len(steps) == 8
    assert [r.finish_reason for r in steps[2]] == [None, None, "stop"] and steps[3][2] is None
    assert [r and r.finish_reason for r in steps[-1]] == ["length", "length", None]


# ----- stopping -------------------------------------------------------------------------


def scripted_text(tok, text):
    return tok.encode(text, add_bos=False)


def test_stop_string_across_token_boundaries():
    _, tok, _ = tiny("gemma3")
    script = scripted_text(tok, "Hello world, this is a test") + [300] * 5
    pieces = [tok.decode([i]) for i in script]
    for stop in ["o w", "rld, th", "is a", "test"]:
        assert not any(stop in p for p in pieces), "the stop must span a token boundary"
        tokens, text, responses = run(Scripted(script), tok, [2, 3], max_tokens=30, stop_strings=[stop])
        full = "Hello world, this is a test"
        assert text == full[: full.index(stop)], stop
        assert responses[-1].finish_reason == "stop"
        assert all(stop not in r.text for r in responses)


def test_held_back_text_is_released_when_no_stop_follows():
    _, tok, _ = tiny("gemma3")
    script = scripted_text(tok, "Hello world")
    _, text, responses = run(Scripted(script), tok, [2], max_tokens=len(script), stop_strings=["worm", "lo!"])
    assert text == "Hello world" and responses[-1].finish_reason == "length"


def test_stop_token_ids_and_eos():
    _, tok, _ = tiny("gemma3")
    script = scripted_text(tok, "Hello world") + [tok.eos_id, 300]
    tokens, text, responses = run(Scripted(script), tok, [2], max_tokens=30)
    assert tokens[-1] == tok.eos_id and text == "Hello world"
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""
    world = scripted_text(tok, "Hello world")[-1]
    tokens, text, _ = run(Scripted(script), tok, [2], max_tokens=30, stop_token_ids=[world])
    assert tokens == script[: script.index(world) + 1] and "world" not in text


def test_stop_token_on_a_real_model():
    model, tok, ref = tiny("gemma3")
    greedy_ids = ref["greedy_ids"].tolist()
    tokens, _, responses = run(model, tok, ref["greedy_prompt"].tolist(), max_tokens=10,
                               stop_token_ids=[greedy_ids[2]])
    assert tokens == greedy_ids[:3] and responses[-1].finish_reason == "stop"


def test_context_length():
    model, tok, _ = tiny("gemma3")
    context = model.args.max_position_embeddings
    with pytest.raises(GenerationError, match="context length"):
        stream_generate(model, tok, [2] * context)
    tokens, _, responses = run(model, tok, [2] + [100] * (context - 5), max_tokens=50)
    assert len(tokens) == 4 and responses[-1].finish_reason == "length"


def test_max_tokens_zero_yields_nothing():
    model, tok, _ = tiny("gemma3")
    assert list(stream_generate(model, tok, "Hi", max_tokens=0)) == []
    assert generate(model, tok, "Hi", max_tokens=0) == ""


@pytest.mark.parametrize("prompt, kwargs, message", [
    ("", {}, "empty"),
    ([], {}, "empty"),
    ("Hi", {"max_tokens": -1}, "max_tokens"),
    ([2, 512], {}, "outside the model's vocabulary"),
    ([2, -1], {}, "outside the model's vocabulary"),
    (42, {}, "prompt must be"),
    ([2, 5], {"chat": True}, "token-id prompts"),
    ([{"role": "user", "content": "Hi"}], {"chat": False}, "chat"),
    ("Hi", {"system": "x"}, "system prompt needs the chat template"),
    ("Hi", {"stop_strings": [""]}, "stop strings"),
    ("Hi", {"stop_token_ids": [9999]}, "stop token id"),
    ("Hi", {"prefill_step_size": 0}, "prefill_step_size"),
])
def test_bad_requests_raise_before_iterating(prompt, kwargs, message):
    model, tok, _ = tiny("gemma3")
    with pytest.raises(GenerationError, match=message):
        stream_generate(model, tok, prompt, **kwargs)


def test_nan_logits_stop_with_an_error():
    _, tok, ref = tiny("gemma3")
    model, _ = load(FIXTURES / "tiny_gemma3")  # a copy of its own, to break
    model.model.norm.weight = mx.full(model.model.norm.weight.shape, float("nan"))
    with pytest.raises(GenerationError, match="NaN"):
        list(stream_generate(model, tok, ref["greedy_prompt"].tolist(), max_tokens=3))


def test_a_processor_that_rules_out_every_token_stops_with_an_error():
    model, tok, ref = tiny("gemma3")
    forbid_all = lambda tokens, logits: mx.full(logits.shape, -mx.inf)  # noqa: E731
    with pytest.raises(GenerationError, match="no finite"):
        list(stream_generate(model, tok, ref["greedy_prompt"].tolist(), max_tokens=3, logits_processors=[forbid_all]))


# ----- command line ---------------------------------------------------------------------


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mlx_gemma.generate", *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, cwd=FIXTURES.parents[1], **kwargs)


def test_cli_generates_and_reports():
    done = cli("--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "Hello world", "--max-tokens", "5")
    assert done.returncode == 0, done.stderr
    model, tok, _ = tiny("gemma3")
    assert done.stdout == generate(model, tok, "Hello world", max_tokens=5) + "\n"
    assert done.stdout.strip()
    assert "Generation: 5 tokens" in done.stderr and "Prompt:" in done.stderr and "Traceback" not in done.stderr


def test_cli_missing_model_is_a_one_line_error():
    done = cli("--model", str(FIXTURES / "no_such_model"), "--prompt", "Hi")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "no_such_model" in done.stderr
    assert done.stdout == ""


def test_cli_bad_setting_exits_2(capsys):
    assert gen.main(["--model", str(FIXTURES / "tiny_gemma3"), "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "top_p" in err and err.count("\n") == 1


def test_cli_ctrl_c_exits_130_with_clean_output(monkeypatch, capsys):
    model, tok, _ = tiny("gemma3")
    expected = generate(model, tok, "Hello world", max_tokens=3) + "\n"
    real = gen.stream_generate

    def interrupted(*args, **kwargs):
        for i, r in enumerate(real(*args, **kwargs)):
            yield r
            if i == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(gen, "stream_generate", interrupted)
    assert gen.main(["--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "Hello world"]) == 130
    captured = capsys.readouterr()
    assert captured.out == expected
    assert captured.err == "interrupted after 3 tokens\n"


def test_cli_reads_the_prompt_from_stdin(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(read=lambda: "Hello world"))
    assert gen.main(["--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "-", "-m", "4"]) == 0
    model, tok, _ = tiny("gemma3")
    assert capsys.readouterr().out == generate(model, tok, "Hello world", max_tokens=4) + "\n"


def test_chat_auto_detection(tmp_path):
    _, tok, _ = tiny("gemma3")
    assert looks_instruct("google/gemma-3-270m-it", None, tok)
    assert looks_instruct(None, "/cache/models--google--gemma-2-2b-it/snapshots/abc", tok)
    assert looks_instruct("my-gemma-instruct", None, tok)
    assert not looks_instruct("google/gemma-2-2b", "/m/gemma-2-2b", tok)
    assert not looks_instruct(None, "/m/gemma-italian", tok)
    # Stop ids do not decide it: Gemma 3 base checkpoints stop on <end_of_turn> too.
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, %d]}' % tok.end_of_turn_id)
    assert not looks_instruct(None, tmp_path, tok)


# ----- cache options (see test_kv_cache.py for the caches themselves) -----------------------


def test_cache_options_reach_the_cache():
    model, tok, ref = tiny("gemma2")
    prompt = ref["input_ids"][0].tolist()
    capped = model.make_cache(max_kv_size=5)
    expected = [ids for ids, _ in generate_step(model, prompt, cache=capped, max_tokens=8)]
    assert [ids for ids, _ in generate_step(model, prompt, max_tokens=8, max_kv_size=5)] == expected
    assert run(model, tok, prompt, max_tokens=8, max_kv_size=5)[0] == [i[0] for i in expected]
    with pytest.raises(GenerationError, match="go to the cache"):
        generate_step(model, prompt, cache=model.make_cache(), max_kv_size=5)
    with pytest.raises(GenerationError, match="head_dim 16"):  # quantization groups are >= 32 wide
        stream_generate(model, tok, prompt, kv_bits=8, kv_group_size=32)


def test_cli_cache_flags():
    done = cli("--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "Hello world", "-m", "6", "--max-kv-size", "6")
    assert done.returncode == 0, done.stderr
    model, tok, _ = tiny("gemma3")
    assert done.stdout == generate(model, tok, "Hello world", max_tokens=6, max_kv_size=6) + "\n"
    done = cli("--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "Hi", "--kv-bits", "4")
    assert done.returncode == 2 and done.stderr.startswith("error: kv_group_size 64 does not divide")


def test_cli_quantized_kv_cache(tmp_path):
    """--kv-bits end to end, on a head_dim-32 twin of the tiny Gemma 3 (quantization groups are >= 32 wide)."""
    import json
    import shutil

    from mlx.utils import tree_flatten

    from mlx_gemma.tensorfile import save_file
    from test_kv_cache import twin

    model, config = twin("gemma3")
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tmp_path / "model.safetensors", dict(tree_flatten(model.parameters())))
    shutil.copy(FIXTURES / "tiny_gemma3" / "tokenizer.model", tmp_path)
    flags = ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "3"]
    done = cli("--model", str(tmp_path), "--prompt", "Hello world, again", "-m", "8", *flags)
    assert done.returncode == 0, done.stderr
    model, tok = load(tmp_path)
    expected = generate(model, tok, "Hello world, again", max_tokens=8, kv_bits=4, kv_group_size=32,
                        quantized_kv_start=3)
    assert done.stdout == expected + "\n"
    assert expected != generate(model, tok, "Hello world, again", max_tokens=8)  # the flags did something


def test_top_level_functional_api_as_mlx_lm():
    """`from mlx_lm import load, generate, stream_generate, batch_generate`, spelled mlx_gemma;
    the CLI module stays importable, and `python -m mlx_gemma.generate` prints no warning."""
    model, tok, _ = tiny("gemma3")
    text = mlx_gemma.generate(model, tok, "Hi", max_tokens=4)
    assert isinstance(text, str)
    pieces = list(mlx_gemma.stream_generate(model, tok, "Hi", max_tokens=4))
    assert len(pieces) == 4 and "".join(r.text for r in pieces) == text
    assert mlx_gemma.batch_generate(model, tok, ["Hi", "Hello there"], max_tokens=4)[0] == text
    from mlx_gemma.generate import main  # noqa: F401  (binds nothing over the function)
    assert callable(mlx_gemma.generate) and mlx_gemma.generate is generate
    done = cli("--model", str(FIXTURES / "tiny_gemma3"), "--prompt", "Hi", "-m", "4")
    assert done.returncode == 0 and done.stdout.startswith(text) and "Warning" not in done.stderr
