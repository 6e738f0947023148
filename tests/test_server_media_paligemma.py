"""mlx_gemma.server serving PaliGemma (a prefix-LM: its prompt attends both ways).

PaliGemma takes no chat template: a chat's prompt is its last (user) message's text with its image,
as mlx-vlm's server reads it (server/media.py).  Greedy answers equal `mlx_gemma.generate` on the tiny
PaliGemma 2 fixture given the same text and image (generate is itself checked against transformers),
streamed and not, and with several clients at once (the scheduler batches their decoding).
"""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest
from test_server import noise_png, start_server, stop_server
from test_server_media import data_url

import mlx_gemma
from mlx_gemma.generate import stream_generate
from mlx_gemma.vision import prompt_rows

from conftest import FIXTURES

PALI = str(FIXTURES / "tiny_paligemma2")
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    proc, url = start_server("--model", PALI)
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pali")
    paths = []
    for seed in (3, 4):
        paths.append(folder / f"{seed}.png")
        paths[-1].write_bytes(noise_png(seed))
    return paths


def reference(text: str, image, max_tokens: int) -> str:
    model, tok = mlx_gemma.load(PALI)
    return "".join(r.text for r in stream_generate(model, tok, text, max_tokens=max_tokens,
                                                   image=None if image is None else str(image)))


def ask(text: str, image=None, earlier=()) -> list:
    parts = [{"type": "text", "text": text}]
    if image is not None:
        parts.insert(0, {"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}})
    return [*earlier, {"role": "user", "content": parts}]


def test_image_prompt_equals_generate_streamed_and_not(server, images):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    ref = reference("caption en", images[0], 12)
    assert ref and ref != reference("caption en", images[1], 12)  # the image matters
    earlier = [{"role": "system", "content": "ignored"}, {"role": "user", "content": "also ignored"},
               {"role": "assistant", "content": "ok"}]
    r = client.chat.completions.create(model=PALI, max_tokens=12, temperature=0, messages=ask("caption en", images[0],
                                                                                             earlier))
    assert r.choices[0].message.content == ref
    model, tok = mlx_gemma.load(PALI)
    assert r.usage.prompt_tokens == len(prompt_rows(model, tok, ["caption en"], [str(images[0])])[0][0])
    stream = client.chat.completions.create(model=PALI, max_tokens=12, temperature=0, stream=True,
                                            messages=ask("caption en", images[0]))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref


def test_concurrent_clients_each_get_what_generate_gives(server, images):
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
    asks = [("caption en", images[0]), ("answer en what is it?", images[1]), ("detect cat", images[1]),
            ("caption es", None)]

    def one(case):
        text, image = case
        r = client.chat.completions.create(model=PALI, max_tokens=10, temperature=0, messages=ask(text, image))
        return r.choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(one, asks))
    assert got == [reference(text, image, 10) for text, image in asks]


REFUSED = [
    ("last message not a user's", [{"role": "user", "content": "caption en"}, {"role": "assistant", "content": "a"}],
     "invalid_messages"),
    ("two images", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noise_png(5, (4, 4)))}}] * 2 + [
        {"type": "text", "text": "caption en"}]}], "too_many_media"),
    ("no text", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noise_png(5, (4, 4)))}}]}], "invalid_messages"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_what_paligemma_cannot_take_is_a_400(server, case):
    _, messages, code = case
    r = httpx.post(server + CHAT, json={"model": PALI, "messages": messages, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    r = httpx.post(server + CHAT, json={"model": PALI, "messages": ask("caption en"), "tools": tools}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
