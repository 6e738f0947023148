"""The server's prefix cache with media: a second chat turn that carries an image (and a clip) reuses
the first turn's prompt with its media blocks, on the tiny Gemma 4 with both towers; the reply
equals `mlx_gemma.generate` on the whole conversation (itself checked against transformers)."""

from __future__ import annotations

import base64

import openai
from test_server import GEMMA4, media_folder, noise_png, shared_server
from test_server_media import data_url, reference


def test_second_turn_with_an_image_and_a_clip_reuses_them_and_equals_generate(tmp_path):
    client = openai.OpenAI(base_url=shared_server() + "/v1", api_key="unused", max_retries=0)
    image, clip = tmp_path / "turns.png", media_folder() / "clip.wav"
    image.write_bytes(noise_png(7))  # an image no other test sends
    parts = [{"type": "image_url", "image_url": {"url": data_url(image.read_bytes())}},
             {"type": "input_audio", "input_audio": {"data": base64.b64encode(clip.read_bytes()).decode(),
                                                     "format": "wav"}},
             {"type": "text", "text": "Describe."}]
    first = client.chat.completions.create(model=GEMMA4, max_tokens=6, temperature=0,
                                           messages=[{"role": "user", "content": parts}])
    reply = first.choices[0].message.content
    turns = [{"role": "user", "content": parts}, {"role": "assistant", "content": reply},
             {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model=GEMMA4, max_tokens=6, temperature=0, messages=turns)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe."}]},
             {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    assert second.choices[0].message.content == reference(GEMMA4, asked, 6, image=[str(image)], audio=[str(clip)])
