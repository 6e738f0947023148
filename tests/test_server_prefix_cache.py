"""The server's prefix cache end to end: a second chat turn reuses the first turn's prompt on the
tiny Gemma 2 and Gemma 3 fixtures, whose sliding windows (6 and 5 tokens) are far shorter than the
conversation, and every greedy reply still equals `mlx_gemma.generate` on the same messages.

The server is test_server.py's (start_server: a real uvicorn subprocess on port 0), with both
models of its own, so other modules' requests never warm its cache; the official `openai` client.
"""

from __future__ import annotations

import openai
import pytest

import mlx_gemma
from conftest import FIXTURES
from mlx_gemma.prefix_cache import DEFAULT_BYTES
from mlx_gemma.server.cli import build_parser
from test_server import reference, start_server, stop_server

GEMMA2 = str(FIXTURES / "tiny_gemma2")
GEMMA3 = str(FIXTURES / "tiny_gemma3")


@pytest.fixture(scope="module")
def client():
    proc, url = start_server("--model", GEMMA2, "--model", GEMMA3, "--prompt-cache-bytes", "64M")
    yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stop_server(proc)


@pytest.mark.parametrize("path", [GEMMA2, GEMMA3])
def test_second_turn_reuses_the_first_turns_prompt_and_equals_generate(client, path):
    loaded = mlx_gemma.load(path)
    messages = [{"role": "user", "content": "Tell me about the sea and the sky, briefly."}]
    window = loaded[0].args.sliding_window
    previous = 0
    for turn, follow_up in enumerate(["And the mountains?", "Why?", "Thanks; one more word."]):
        ref = reference(loaded, messages, 12, chat=True)
        r = client.chat.completions.create(model=path, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == ref.text
        assert r.usage.prompt_tokens == ref.prompt_tokens > window
        cached = r.usage.prompt_tokens_details.cached_tokens
        assert previous <= cached < r.usage.prompt_tokens
        if turn:  # the earlier turns' prompt was reused; only the new turn was prefilled
            assert cached >= previous > window
        previous = r.usage.prompt_tokens
        messages = messages + [{"role": "assistant", "content": r.choices[0].message.content},
                               {"role": "user", "content": follow_up}]


def test_streamed_second_turn_reports_cached_tokens(client):
    loaded = mlx_gemma.load(GEMMA2)
    first = [{"role": "user", "content": "Count to three."}]
    r = client.chat.completions.create(model=GEMMA2, messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": r.choices[0].message.content},
                      {"role": "user", "content": "Again."}]
    ref = reference(loaded, second, 8, chat=True)
    chunks = list(client.chat.completions.create(model=GEMMA2, messages=second, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == ref.prompt_tokens
    assert usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens


@pytest.mark.parametrize("value, expected", [(None, DEFAULT_BYTES), ("0", 0), ("1000", 1000), ("512M", 512 * 10**6),
                                             ("2G", 2 * 10**9), ("1.5GB", 15 * 10**8)])
def test_prompt_cache_bytes_flag(value, expected):
    args = ["--model", GEMMA2] + ([] if value is None else ["--prompt-cache-bytes", value])
    assert build_parser().parse_args(args).prompt_cache_bytes == expected


@pytest.mark.parametrize("value", ["x", "-1", "5K", "nan", "inf"])
def test_prompt_cache_bytes_flag_refuses_what_is_not_a_size(value, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", GEMMA2, "--prompt-cache-bytes", value])
    err = capsys.readouterr().err
    assert "not a byte count" in err or "must be >= 0" in err
