"""mlx_gemma.server with images and audio: `image_url` (data URLs; local paths only under
--allow-image-dir) and `input_audio` parts on the tiny Gemma 3 vision and Gemma 4 (vision + audio)
fixtures.  Greedy answers equal `mlx_gemma.generate` given the same files, streamed and not; remote
URLs, paths outside the folder, corrupt data and media a model cannot take are 400s naming no
server path.
"""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from test_server import GEMMA4, VLM3, media_folder, noise_png, shared_server, wav_bytes

import mlx_gemma
from mlx_gemma.generate import stream_generate

MM4 = GEMMA4
CHAT = "/v1/chat/completions"


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


@pytest.fixture(scope="module")
def folder():
    return media_folder()


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)


def reference(folder_name: str, messages, max_tokens: int, **media) -> str:
    model, tok = mlx_gemma.load(folder_name)
    return "".join(r.text for r in stream_generate(model, tok, messages, max_tokens=max_tokens,
                                                   stop_token_ids=[tok.end_of_turn_id], **media))


def test_gemma3_image_equals_generate(client, folder):
    image = folder / "allowed" / "a.png"
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    ref = reference(VLM3, asked, 16, image=[str(image)])
    assert ref != reference(VLM3, asked, 16, image=[str(folder / "white.png")])  # the image matters
    for url in (data_url(image.read_bytes()), "a.png", f"file://{image}"):
        r = client.chat.completions.create(model=VLM3, max_tokens=16, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What?"}]}])
        assert r.choices[0].message.content == ref


def test_gemma4_image_and_audio_equal_generate_streamed(client, folder):
    image, clip = folder / "outside.png", folder / "clip.wav"  # random pixels
    ref = reference(MM4, [{"role": "user", "content": [{"type": "image"}, {"type": "audio"},
                                                       {"type": "text", "text": "Describe."}]}],
                    12, image=[str(image)], audio=[str(clip)])
    assert ref != reference(MM4, [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {
        "type": "text", "text": "Describe."}]}], 12, image=[str(folder / "white.png")], audio=[str(clip)])
    stream = client.chat.completions.create(model=MM4, max_tokens=12, temperature=0, stream=True, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(),
                                                    "format": "wav"}},
            {"type": "text", "text": "Describe."}]}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref


def image_message(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


REFUSED = [
    ("remote http URL", "invalid_image_url", VLM3, image_message("http://example.com/cat.png")),
    ("remote https URL", "invalid_image_url", VLM3, image_message("https://example.com/cat.png")),
    ("protocol-relative URL", "invalid_image_url", VLM3, image_message("//example.com/cat.png")),
    ("path outside the folder", "invalid_image_url", VLM3, image_message("../outside.png")),
    ("absolute path outside", "invalid_image_url", VLM3, image_message("/etc/passwd")),
    ("symlink out of the folder", "invalid_image_url", VLM3, image_message("link.png")),
    ("missing file", "invalid_image_url", VLM3, image_message("nope.png")),
    ("bad base64", "invalid_base64", VLM3, image_message("data:image/png;base64,@@@@")),
    ("empty data", "invalid_base64", VLM3, image_message("data:image/png;base64,")),
    ("not base64 data URL", "invalid_image_url", VLM3, image_message("data:image/png,rawbytes")),
    ("non-image data URL", "invalid_image_url", VLM3, image_message(data_url(b"hello", "text/plain"))),
    ("corrupt image", "invalid_media", VLM3, image_message(data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64))),
    ("audio to a model without audio", "unsupported_content", VLM3, [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav_bytes()).decode(), "format": "wav"}}]}]),
    ("corrupt audio", "invalid_media", MM4, [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF0000WAVE").decode(),
                                                "format": "wav"}}]}]),
    ("seventeen images", "too_many_media", VLM3, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(noise_png(2, (4, 4)))}}] * 17}]),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_media_is_a_400_naming_no_server_path(folder, case):
    _, code, model, messages = case
    r = httpx.post(shared_server() + CHAT, json={"model": model, "messages": messages, "max_tokens": 2}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"] == code
    # the model's id is the path it was served from (as mlx-lm's server names models); nothing else
    # of the server's file system may show
    text = r.text.replace(str(model), "MODEL")
    assert str(folder) not in text and "/tmp" not in text and "Traceback" not in text


def test_thinking_with_a_gemma3_image_is_refused():
    r = httpx.post(shared_server() + CHAT, json={"model": VLM3, "messages": image_message("a.png"),
                                        "chat_template_kwargs": {"enable_thinking": True}}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
