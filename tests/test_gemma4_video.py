"""Gemma 4 video (mlx_gemma/gemma4_video.py, the video paths of gemma4_prompts and generate) against
transformers 5.25's Gemma4VideoProcessor, Gemma4Processor and Gemma4ForConditionalGeneration.

The video processor needs torchvision, which does not install beside the references' torch: its
outputs are in tests/fixtures/gemma4_video.npz, made by tests/fixtures/make_gemma4_video.py in an
environment of its own (frames, pixel values, frame indices and times, the expanded prompt and its
ids, logits and greedy tokens of the tiny multimodal model).  transformers' prompts put `<|video|>`
where mlx_gemma feeds the model's image id (gemma4_video's notes): ids are compared with that swap.
"""

from __future__ import annotations

import json
import shutil
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES
from fixtures.make_gemma4_video import clip, write_video

from mlx_gemma.api import load
from mlx_gemma.errors import ConfigError, GenerationError, ImageError
from mlx_gemma.gemma4_images import ImageSettings, pad_patches
from mlx_gemma.gemma4_prompts import media_rows
from mlx_gemma.gemma4_video import (
    VideoSettings,
    load_video,
    preprocess_video,
    read_video,
    resize_frames,
    sample_frame_indices,
    sampled_indices,
    video_text,
)
from mlx_gemma.generate import generate, main, stream_batch_generate, stream_generate
from mlx_gemma.prompt_cache import PromptCache

REF = FIXTURES / "gemma4_video.npz"
TINY = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3)  # make_gemma4_video.py's processor
SETTINGS = VideoSettings(image=ImageSettings(**TINY), num_frames=4)
CHAT = "<bos><|turn>user\n<|video|>What happens?<turn|>\n<|turn>model\n"
VIDEO_ID, IMAGE_ID = 23, 18  # the tiny Gemma 4 tokenizer's <|video|> and <|image|>


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(REF))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny multimodal model with the fixture's video processor settings (4 frames)."""
    out = tmp_path_factory.mktemp("tiny_gemma4_video") / "model"
    shutil.copytree(FIXTURES / "tiny_gemma4_mm", out)
    config = json.loads((out / "processor_config.json").read_text())
    (out / "processor_config.json").write_text(json.dumps({**config, "video_processor": {**TINY, "num_frames": 4}}))
    return out


@pytest.fixture(scope="module")
def loaded(folder):
    return load(str(folder))


def as_fed(ids: np.ndarray) -> list[int]:
    """transformers' ids as mlx_gemma feeds them: a frame's <|video|> soft tokens as <|image|>."""
    return np.where(ids == VIDEO_ID, IMAGE_ID, ids).reshape(-1).tolist()


def test_pixels_positions_and_times_equal_the_video_processor(ref):
    """Enlarged (36 x 52, 8 fps) and shrunk (100 x 80, fps unknown) frames: pixel values within
    1e-5 (in fact the same bytes / 255), positions, soft tokens, frame indices and times equal."""
    up = preprocess_video(ref["up_frames"], 8.0, SETTINGS)
    assert sampled_indices(7, SETTINGS, None).tolist() == ref["down_indices"].tolist()
    down = preprocess_video(ref["down_frames"], None, SETTINGS, indices=ref["down_indices"])
    for case, video in (("up", up), ("down", down)):
        theirs = ref[f"{case}_pixel_values"].astype(np.float32) / 255.0
        assert np.abs(np.array(video.pixel_values) - theirs).max() < 1e-5
        assert np.array_equal(np.array(video.position_ids), ref[f"{case}_video_position_ids"])
        assert video.num_soft_tokens == int(ref[f"{case}_num_soft_tokens"][0])
        assert video.indices == ref[f"{case}_indices"].tolist()
        assert np.allclose(video.timestamps, ref[f"{case}_timestamps"], rtol=0, atol=1e-12)
        assert video_text(video) in str(ref[f"{case}_text"])


def test_prompt_ids_equal_the_processor(loaded, ref):
    """Plain prompts (a video; an image then a video) and a chat: transformers' ids, <|video|> as fed."""
    model, tok = loaded
    up = load_video(ref["up_frames"], SETTINGS, fps=8.0)  # bare frames are taken at 24 fps: this one is 8
    rows, media = media_rows(model, tok, ["Watch <|video|> closely."], [None], [None], videos=[up])
    assert rows[0] == as_fed(ref["up_input_ids"]) and media.image_tokens == (int(ref["up_num_soft_tokens"][0]),) * 4
    rows, media = media_rows(model, tok, ["<|image|> then <|video|>: same?"], [ref["image"]], [None],
                             videos=[ref["down_frames"][[0, 1, 1, 2, 2, 3, 3]]])  # sampled back to 0 1 3 5
    assert rows[0] == as_fed(ref["down_input_ids"])
    assert len(media.image_tokens) == 5 and media.image_tokens[1:] == (int(ref["down_num_soft_tokens"][0]),) * 4
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert tok.apply_chat_template(messages) == CHAT  # the string the fixture's chat case expands
    rows, _ = media_rows(model, tok, [messages], [None], [None], videos=[up])
    assert rows[0] == as_fed(ref["chat_input_ids"])


def test_file_is_decoded_and_sampled_as_transformers(loaded, ref, tmp_path):
    """A lossless MP4 written here: PyAV's frames are the written ones, at transformers' indices,
    times and fps (read_video_pyav), and the prompt's ids are the processor's."""
    frames = clip(20, 48, 64, 0.3)  # as the fixture's file: 20 frames at 10 fps
    pytest.importorskip("av")
    write_video(tmp_path / "clip.mp4", frames, 10)
    decoded, fps, indices = read_video(tmp_path / "clip.mp4", SETTINGS)
    assert indices.tolist() == ref["file_indices"].tolist() and fps == float(ref["file_fps"])
    assert np.array_equal(decoded, frames[indices])
    video = load_video(tmp_path / "clip.mp4", SETTINGS)
    assert np.allclose(video.timestamps, ref["file_timestamps"], rtol=0, atol=1e-12)
    model, tok = loaded
    rows, _ = media_rows(model, tok, ["<|video|>"], [None], [None], videos=[str(tmp_path / "clip.mp4")])
    assert rows[0] == as_fed(ref["file_input_ids"])


def test_video_file_generates_transformers_tokens(loaded, ref, tmp_path):
    """generate(video="clip.mp4") with the "up" frames written at 8 fps: transformers' logits (within
    1e-4 of their scale) and greedy tokens; the same for the image-then-video prompt (frames given
    as an array)."""
    model, tok = loaded
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    write_video(path, ref["up_frames"], 8)
    for case, prompt, image, video in (("up", "Watch <|video|> closely.", None, str(path)),
                                       ("down", "<|image|> then <|video|>: same?", ref["image"],
                                        ref["down_frames"][[0, 1, 1, 2, 2, 3, 3]])):
        rows, media = media_rows(model, tok, [prompt], [image], [None], videos=[video])
        logits = model(mx.array(rows), **media.inputs())[0, mx.array(ref[f"{case}_positions"])]
        theirs = ref[f"{case}_logits"]
        assert float(np.abs(np.array(logits) - theirs).max() / np.abs(theirs).max()) < 1e-4
        tokens = [r.token for r in stream_generate(model, tok, prompt, max_tokens=8, image=image, video=video,
                                                   chat=False)]
        assert tokens == ref[f"{case}_greedy"].tolist()


def test_batch_and_cli_take_videos(loaded, folder, ref, tmp_path, capsys):
    model, tok = loaded
    pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    write_video(path, ref["up_frames"], 8)
    steps = list(stream_batch_generate(model, tok, ["Watch <|video|> closely.", "Hello"], max_tokens=8,
                                       video=[str(path), None], chat=False))
    first = [s[0].token for s in steps if s[0] is not None]
    assert first == ref["up_greedy"].tolist()
    assert main(["--model", str(folder), "--video", str(path), "-p", "Watch <|video|> closely.", "--max-tokens", "8",
                 "--no-chat"]) == 0
    expected = generate(model, tok, "Watch <|video|> closely.", max_tokens=8, video=str(path), chat=False)
    assert capsys.readouterr().out == expected + "\n"


def test_bad_videos_give_typed_errors(loaded, ref, tmp_path, monkeypatch):
    model, tok = loaded
    pytest.importorskip("av")
    (tmp_path / "not.mp4").write_text("not a video")
    with pytest.raises(ImageError, match="decode"):
        load_video(tmp_path / "not.mp4", SETTINGS)
    with pytest.raises(ImageError, match="no such"):
        load_video(tmp_path / "missing.mp4", SETTINGS)
    with pytest.raises(ImageError, match="uint8 array"):
        load_video(ref["up_frames"][0], SETTINGS)
    with pytest.raises(ImageError, match="cannot sample 4 frames"):
        load_video(ref["up_frames"][:3], SETTINGS)
    with pytest.raises(ImageError, match="2 <\\|video\\|> markers for 1"):
        media_rows(model, tok, ["<|video|> <|video|>"], [None], [None], videos=[ref["up_frames"]])
    with pytest.raises(ImageError, match="0 video parts for 1"):
        media_rows(model, tok, [[{"role": "user", "content": "Hi"}]], [None], [None], videos=[ref["up_frames"]])
    with pytest.raises(GenerationError, match="token ids"):
        media_rows(model, tok, [[2, 5, 6]], [None], [None], videos=[ref["up_frames"]])
    text_model, text_tok = load(str(FIXTURES / "tiny_gemma4_e2b"))
    with pytest.raises(ImageError, match="no vision tower"):
        generate(text_model, text_tok, "Hi", max_tokens=2, video=ref["up_frames"])
    monkeypatch.setitem(sys.modules, "av", None)  # PyAV not installed
    with pytest.raises(ImageError, match="mlx_gemma\\[video\\]"):
        load_video(tmp_path / "not.mp4", SETTINGS)


def test_settings_from_the_processor_file():
    """The video processor's own fields (as Gemma4VideoProcessor().to_dict() writes them)."""
    saved = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
             "do_sample_frames": True, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
             "max_soft_tokens": 70, "num_frames": 32, "patch_size": 16, "pooling_kernel_size": 3, "resample": 3,
             "rescale_factor": 0.00392156862745098, "return_metadata": False,
             "video_processor_type": "Gemma4VideoProcessor"}
    settings = VideoSettings.from_dict(saved)
    assert settings.num_frames == 32 and settings.image.max_patches == 630 and settings.do_sample_frames
    assert settings.extra == {"return_metadata": False, "video_processor_type": "Gemma4VideoProcessor"}
    by_rate = VideoSettings.from_dict({"fps": 2, "num_frames": None})
    # Gemma4VideoProcessor(fps=2, num_frames=None) took frames 0, 5, ..., 35 of 40 at 10 fps (run with torchvision).
    assert sampled_indices(40, by_rate, 10.0).tolist() == list(range(0, 40, 5))
    assert VideoSettings.from_dict({}).num_frames == 32
    for both in ({"num_frames": 8, "fps": 1.0}, {"fps": 2}):  # the processor refuses fps beside 32 frames too
        with pytest.raises(ConfigError, match="exclude"):
            VideoSettings.from_dict(both)
    with pytest.raises(ConfigError, match="resample"):
        VideoSettings.from_dict({"resample": 2})
    with pytest.raises(ConfigError, match="num_frames"):
        VideoSettings.from_dict({"num_frames": 0})
    with pytest.raises(ConfigError, match="max_soft_tokens"):
        VideoSettings.from_dict({"max_soft_tokens": 100})


@pytest.mark.oracle
def test_resize_equals_torch_uint8_antialiased_bicubic():
    """resize_frames against torch's interpolate(bicubic, antialias=True) on uint8 (what torchvision's
    resize runs on the CPU), shrinking and enlarging, noise and smooth frames: the same bytes."""
    import torch  # oracle
    import torch.nn.functional as F  # oracle

    rng = np.random.default_rng(0)
    for trial in range(60):
        H, W = rng.integers(2, 160, 2)
        h, w = rng.integers(1, 200, 2)
        frames = rng.integers(0, 256, (2, H, W, 3), dtype=np.uint8)
        if trial % 2:
            ramp = np.linspace(0, 255, W)[None, None, :, None] + rng.normal(0, 20, (2, H, W, 3))
            frames = np.clip(ramp, 0, 255).astype(np.uint8)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        theirs = F.interpolate(x, size=(int(h), int(w)), mode="bicubic", antialias=True, align_corners=False)
        assert np.array_equal(resize_frames(frames, int(h), int(w)), theirs.permute(0, 2, 3, 1).numpy())


@pytest.mark.oracle
def test_frame_sampling_and_video_text_equal_transformers():
    from transformers import Gemma4Processor  # oracle
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn  # oracle

    for total, num, fps, video_fps in [(100, 32, None, 25.0), (32, 32, None, 30.0), (97, 7, None, None),
                                       (300, None, 1.0, 30.0), (10, None, 0.01, 30.0), (50, None, None, None)]:
        metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
        expected = default_sample_indices_fn(metadata, num_frames=num, fps=fps)
        assert np.array_equal(sample_frame_indices(total, num, fps, video_fps), expected)
    frames = np.random.default_rng(1).integers(0, 256, (90, 40, 60, 3), dtype=np.uint8)
    video = preprocess_video(frames, 1.5, VideoSettings(num_frames=6))
    metadata = VideoMetadata(total_num_frames=90, fps=1.5, frames_indices=sample_frame_indices(90, 6))
    shim = type("Shim", (), {"boi_token": "<|image>", "eoi_token": "<image|>", "video_token": "<|video|>"})()
    inputs = {"num_soft_tokens_per_video": [video.num_soft_tokens], "video_metadata": [metadata]}
    assert video_text(video) == Gemma4Processor.replace_video_token(shim, inputs, 0)
    assert video.timestamps == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]


def test_chunked_prefill_and_prompt_cache_keep_video_frames_whole(loaded, ref):
    """Prefill in 16-token chunks (each frame's block kept in one call: the model attends it both
    ways) gives transformers' greedy tokens; a second chat turn over a prompt cache feeds only its
    new tokens while the video is the same, and replies as a fresh run does."""
    model, tok = loaded
    up = load_video(ref["up_frames"], SETTINGS, fps=8.0)
    tokens = [r.token for r in stream_generate(model, tok, "Watch <|video|> closely.", max_tokens=8, video=up,
                                               chat=False, prefill_step_size=16)]
    assert tokens == ref["up_greedy"].tolist()
    cache = PromptCache(model)  # the tiny model's 24-token window cannot go back: each turn continues the last
    first = list(stream_generate(model, tok, "Watch <|video|> closely.", video=up, max_tokens=1, chat=False,
                                 prompt_cache=cache))
    follow = "Watch <|video|> closely. And then?"
    second = list(stream_generate(model, tok, follow, video=up, max_tokens=3, chat=False, prompt_cache=cache))
    fresh = list(stream_generate(model, tok, follow, video=up, max_tokens=3, chat=False))
    assert [r.token for r in second] == [r.token for r in fresh]
    assert second[0].prompt_tokens == fresh[0].prompt_tokens - first[0].prompt_tokens  # the frames were held
    other = load_video(ref["up_frames"][::-1].copy(), SETTINGS, fps=8.0)
    again = list(stream_generate(model, tok, follow, video=other, max_tokens=3, chat=False, prompt_cache=cache))
    assert again[0].prompt_tokens == fresh[0].prompt_tokens  # other frames: fed again from the start
    assert [r.token for r in again] == [r.token for r in stream_generate(model, tok, follow, video=other,
                                                                         max_tokens=3, chat=False)]


def test_frames_padded_to_an_image_budget_give_the_same_features(loaded, ref):
    """A prompt with images (280-token budget) and a video (70) pads the frames' patches to the
    images' count: the tower masks padding, so each frame's soft tokens stay the same."""
    model, _ = loaded
    video = load_video(ref["up_frames"], SETTINGS, fps=8.0)
    pixels, positions = np.array(video.pixel_values), np.array(video.position_ids)
    wide = [pad_patches(p, q, 4 * pixels.shape[1]) for p, q in zip(pixels, positions)]
    short = model.model.image_features(video.pixel_values, video.position_ids)
    long = model.model.image_features(mx.array(np.stack([p for p, _ in wide])), mx.array(np.stack([q for _, q in wide])))
    assert float(mx.abs(short - long).max()) < 1e-5 * float(mx.abs(short).max())


def test_a_container_without_a_frame_count_is_counted(tmp_path):
    """Matroska states no frame count (PyAV's stream.frames is 0, where transformers' reader would
    sample nothing): the frames are counted by decoding, then sampled as for an MP4."""
    pytest.importorskip("av")
    frames = clip(9, 30, 40, 0.5)
    write_video(tmp_path / "clip.mkv", frames, 12, codec="ffv1", pix_fmt="bgr0", options={})  # lossless
    decoded, fps, indices = read_video(tmp_path / "clip.mkv", SETTINGS)
    assert indices.tolist() == sample_frame_indices(9, 4).tolist() and fps == 12.0
    assert np.array_equal(decoded, frames[indices])


@pytest.mark.oracle
def test_lossy_file_decodes_as_transformers_read_video_pyav(tmp_path):
    """An ordinary H.264 (yuv420p, lossy) clip: our frames, indices and fps are those of transformers'
    `read_video_pyav` with the video processor's sampling (32 frames of 45, and 2 a second)."""
    pytest.importorskip("av")
    from transformers.video_utils import default_sample_indices_fn, read_video_pyav  # oracle

    write_video(tmp_path / "clip.mp4", clip(45, 48, 64, 0.2), 30, codec="libx264", pix_fmt="yuv420p",
                options={"crf": "30"})
    for settings, kwargs in ((VideoSettings(), {"num_frames": 32}), (VideoSettings(num_frames=None, fps=2.0),
                                                                       {"fps": 2.0})):
        ours, fps, indices = read_video(tmp_path / "clip.mp4", settings)
        sample = lambda metadata, **_: default_sample_indices_fn(metadata, **kwargs)  # noqa: E731
        theirs, meta = read_video_pyav(str(tmp_path / "clip.mp4"), sample_indices_fn=sample)
        assert indices.tolist() == list(meta.frames_indices) and fps == meta.fps
        assert np.array_equal(ours, theirs)
