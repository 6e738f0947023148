"""mlx_gemma.server with `video_url` parts (vLLM's and mlx-vlm's shape) on the tiny Gemma 4 with both
towers, given the video fixture's processor settings (4 frames, as tests/test_gemma4_video.py).

A video comes as a data URL or a path under --allow-media-dir (--allow-image-dir's new name), is
decoded with PyAV and laid out as `generate(video=...)` lays it out: greedy answers equal
`mlx_gemma.generate` on the same file (itself checked against transformers in test_gemma4_video.py).
"""

from __future__ import annotations

import base64
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
from test_server import start_server, stop_server

import mlx_gemma
from mlx_gemma.generate import stream_generate

from conftest import FIXTURES
from fixtures.make_gemma4_video import write_video

TINY = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)  # make_gemma4_video.py's processor
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("av")
    root = tmp_path_factory.mktemp("video")
    model = root / "model"
    shutil.copytree(FIXTURES / "tiny_gemma4_mm", model)
    config = json.loads((model / "processor_config.json").read_text())
    (model / "processor_config.json").write_text(json.dumps({**config, "video_processor": {**TINY, "num_frames": 4}}))
    (root / "allowed").mkdir()
    ref = dict(np.load(FIXTURES / "gemma4_video.npz"))
    write_video(root / "allowed" / "up.mp4", ref["up_frames"], 8)
    write_video(root / "down.mp4", ref["down_frames"], 8)
    proc, url = start_server("--model", str(model), "--allow-media-dir", str(root / "allowed"))
    yield root, str(model), url
    stop_server(proc)


def video_chat(url: str, text: str = "What happens?") -> list:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def reference(model_dir: str, path, max_tokens: int) -> str:
    model, tok = mlx_gemma.load(model_dir)
    asked = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    return "".join(r.text for r in stream_generate(model, tok, asked, max_tokens=max_tokens, video=[str(path)],
                                                   stop_token_ids=[tok.end_of_turn_id]))


def test_video_url_equals_generate(setup):
    root, model_dir, url = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    up, down = root / "allowed" / "up.mp4", root / "down.mp4"
    ref = reference(model_dir, up, 8)
    assert ref != reference(model_dir, down, 8)  # the video matters
    data = f"data:video/mp4;base64,{base64.b64encode(up.read_bytes()).decode()}"
    for source in (data, "up.mp4", f"file://{up}"):
        r = client.chat.completions.create(model=model_dir, max_tokens=8, temperature=0, messages=video_chat(source))
        assert r.choices[0].message.content == ref
    stream = client.chat.completions.create(model=model_dir, max_tokens=8, temperature=0, stream=True,
                                            messages=video_chat(data))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref


@pytest.mark.parametrize("source, code", [
    ("https://example.com/a.mp4", "invalid_video_url"),
    ("../down.mp4", "invalid_video_url"),
    ("data:image/png;base64,AAAA", "invalid_video_url"),
    (f"data:video/mp4;base64,{base64.b64encode(b'not a video').decode()}", "invalid_media"),
])
def test_bad_videos_are_400s(setup, source, code):
    root, model_dir, url = setup
    r = httpx.post(url + CHAT, json={"model": model_dir, "messages": video_chat(source), "max_tokens": 2}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == code
    assert str(root) not in r.text.replace(model_dir, "MODEL") and "Traceback" not in r.text
