"""The scripts in examples/ run as they are (on the tiny Gemma 3 fixture, 3 new tokens).

Each runs in a subprocess, as a user would run it; its printed text is checked
against the library calls it demonstrates, made here in-process (those calls are
themselves checked against transformers and keras-hub in their own test files).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.chat import ChatSession
from mlx_gemma.generate import generate, stream_generate

EXAMPLES = Path(__file__).parent.parent / "examples"
MODEL = FIXTURES / "tiny_gemma3"
N = 3


def run(script: str, stdin: str = "", model: Path = MODEL) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--model", str(model), "--max-tokens", str(N)],
                          input=stdin, capture_output=True, text=True, encoding="utf-8", env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def loaded():
    return mlx_gemma.load(MODEL)


def sections(stdout: str) -> dict[str, list[str]]:
    """'== title' headed blocks of lines."""
    out: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if line.startswith("== "):
            out[line[3:]] = current = []
        elif out:
            current.append(line)
    return out


def test_generate_stream(loaded):
    done = run("generate_stream.py")
    model, tokenizer = loaded
    assert done.stdout == generate(model, tokenizer, "The three primary colours are", max_tokens=N) + "\n"
    assert f"Generation: {N} tokens" in done.stderr and "finish reason: length" in done.stderr


def test_batch_samplers(loaded):
    blocks = sections(run("batch_samplers.py").stdout)
    model, tokenizer = loaded
    pairs = [[ast.literal_eval(part) for part in line.split(" -> ", 1)] for line in blocks["greedy"]]
    assert len(pairs) == 3
    # Batched greedy rows are what each prompt gives alone.
    assert [text for _, text in pairs] == [generate(model, tokenizer, p, max_tokens=N) for p, _ in pairs]
    assert len(blocks) == 6 and all(blocks.values())


def test_keras_style():
    done = run("keras_style.py")
    blocks = sections(done.stdout)
    lm = mlx_gemma.GemmaCausalLM.from_preset(MODEL)
    length = 1 + len(lm.preprocessor.tokenizer("I want to say")) + N
    assert ast.literal_eval(blocks["greedy (GemmaCausalLM's default)"][0]) == lm.generate("I want to say",
                                                                                         max_length=length)
    assert len(blocks) == 5 and all(blocks.values())


def test_keras_pali_gemma():
    model = FIXTURES / "tiny_paligemma"
    blocks = sections(run("keras_pali_gemma.py", model=model).stdout)
    lm = mlx_gemma.PaliGemmaCausalLM.from_preset(model)
    image = np.random.default_rng(0).random((42, 42, 3))  # the script's default image at the fixture's size
    question = "answer en where is the cow standing?\n"
    length = 1 + len(lm.preprocessor.tokenizer(question)) + N
    assert ast.literal_eval(blocks["one image, one prompt"][0]) == lm.generate({"images": image, "prompts": question},
                                                                               max_length=length)
    assert len(blocks) == 3 and all(blocks.values())


def test_chat(loaded):
    done = run("chat.py", stdin="Hello\nHow are you?\n")
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=N)
    want = [session.reply("Hello"), session.reply("How are you?")]
    assert done.stdout == f">> {want[0]}\n>> {want[1]}\n>> ({len(session.history)} tokens in the conversation)\n"


def test_server_client(tmp_path):
    # The script starts the server on the tiny Gemma 3 vision fixture and sends its drawn picture as a data URL.
    model = FIXTURES / "tiny_gemma3_vlm"
    done = run("server_client.py", model=model)
    spec = importlib.util.spec_from_file_location("server_client", EXAMPLES / "server_client.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lm, tokenizer = mlx_gemma.load(model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]

    image = tmp_path / "picture.png"
    image.write_bytes(script.picture())
    want = list(stream_generate(lm, tokenizer, messages, max_tokens=N, image=[str(image)],
                                stop_token_ids=[tokenizer.end_of_turn_id]))
    assert done.stdout == "".join(r.text for r in want) + "\n"
    # The server counted the image's tokens in the prompt, as generate lays them out.
    assert f"prompt tokens: {want[-1].prompt_tokens} (image included), completion tokens: {N}" in done.stderr
