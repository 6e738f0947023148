"""Images, audio and video on the server across ranks (issue 23; mlx_gemma/distributed/media_messages.py).

In this process: a job's media travel exactly (dtype, shape and bytes, bfloat16 included) in its
payload; under pipeline the followers get stand-ins whose prefix-cache names (by the scheduler's own
digest functions) are equal exactly where rank 0's are; a payload that does not fit its description
is a DistributedError.

Across two ranks (`mlx.launch -n 2 --backend ring`, tests/test_distributed_server.py's launcher), one
launch per model and strategy, through the official `openai` client: greedy chats with an image
(Gemma 3 with images, PaliGemma 2), with an image, a clip and a video (Gemma 4 with both towers) equal
one process's `mlx_gemma.generate` on the same files (itself checked against transformers); a media
request and a text request at once each get what they get alone; a second turn carrying the image
reuses it from the prefix cache (cached_tokens) on both ranks alike and still equals generate; SIGTERM
then ends both ranks with status 0 (still in step).  The tiny Gemma 4 has no pipeline cut (its KV-shared
layers read layers 0-1), so the pipeline serves a copy without KV sharing (`splittable`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import openai
import pytest
from conftest import FIXTURES
from fixtures.make_gemma4_video import write_video
from test_distributed_server import serving
from test_server import GEMMA4, VLM3, noise_png, solid_png, wav_bytes
from test_server_media import data_url

import mlx_gemma
from mlx_gemma.distributed import media_messages, messages
from mlx_gemma.distributed.job_messages import job_payload, refusal, row_from
from mlx_gemma.errors import DistributedError
from mlx_gemma.generate import stream_generate
from mlx_gemma.gemma4_prompts import Gemma4Media
from mlx_gemma.image_chat import image_digests
from mlx_gemma.jobs import Job, Row
from mlx_gemma.models.base import RankShare


def host_bytes(a: mx.array) -> bytes:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).tobytes()


def gemma4_media(seed: int, images: int, clips: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"pixel_values": mx.array(rng.random((images, 12, 48), np.float32)).astype(mx.bfloat16),
            "image_positions": mx.array(rng.integers(-1, 3, (images, 12, 2)), mx.int32),
            "audio_features": mx.array(rng.standard_normal((clips, 20, 8), np.float32)),
            "audio_mask": mx.array(rng.random((clips, 20)) < 0.8)}


class _Model:
    """What job_payload reads of rank 0's model: its share."""

    def __init__(self, strategy: str | None):
        self.share = None if strategy is None else RankShare(strategy, 0, 2, False)


def test_media_travel_exactly_under_tensor_parallel():
    media = gemma4_media(0, 2, 1)
    for model in (None, _Model("tensor"), _Model("pipeline")):
        described, blob = media_messages.encode(media, media_messages.stand_ins(model))
        got = media_messages.decode(json.loads(json.dumps(described)), blob)
        assert list(got) == list(media)
        if model is None or model.share.strategy == "tensor":
            for key, value in media.items():
                assert (got[key].dtype, got[key].shape, host_bytes(got[key])) == \
                    (value.dtype, value.shape, host_bytes(value)), key
        else:  # 32 bytes an item
            assert len(blob) == 32 * (2 + 2 + 1 + 1)
            assert all(got[k].shape == (media[k].shape[0], 32) and got[k].dtype == mx.uint8 for k in media)
    assert media_messages.encode(None) == (None, b"") and media_messages.decode(None, b"") is None


def test_pipeline_stand_ins_name_items_as_rank_0_does():
    """The follower's scheduler names the stand-ins with the digest functions rank 0 uses on the arrays:
    equal names exactly for equal items, so both ranks' prefix caches hit and miss alike."""
    a, b = gemma4_media(1, 2, 2), gemma4_media(2, 1, 1)
    both = {k: mx.concatenate([a[k], b[k], a[k][:1]]) for k in a}  # items 0 and 3 of each kind are equal
    stand = media_messages.decode(*media_messages.encode(both, True))
    want, got = Gemma4Media(**both).digests(), Gemma4Media(**stand).digests()
    assert len(got) == len(want) == 8
    assert [[x == y for y in want] for x in want] == [[x == y for y in got] for x in got]
    assert want[0] == want[3] and want[0] != want[1]
    pixels = mx.array(np.random.default_rng(3).random((3, 8, 8, 3), np.float32))[mx.array([0, 1, 0])]
    want, got = image_digests(pixels), image_digests(media_messages.decode(*media_messages.encode(
        {"pixel_values": pixels}, True))["pixel_values"])
    assert [[x == y for y in want] for x in want] == [[x == y for y in got] for x in got] and want[0] == want[2]
    # each stand-in item is the sha256 of the float32 bytes rank 0's digest reads of it
    item = np.array(pixels[1].astype(mx.float32)).tobytes()
    assert bytes(np.array(media_messages.item_names(pixels)[1])) == hashlib.sha256(item).digest()


def test_a_job_with_media_is_sent_and_read_back():
    model, _ = mlx_gemma.load(VLM3)
    spec = model.image_input
    ids = [2, spec.start_id, *[spec.token_id] * spec.num_tokens, spec.end_id, 3]
    pixels = mx.array(np.random.default_rng(0).random((1, 4, 4, 3), np.float32)).astype(mx.bfloat16)
    job = Job(ids, 3, media={"pixel_values": pixels})
    assert refusal(job) is None
    payload = job_payload(Row(7, job, print, 3))
    back = row_from(model, payload)
    assert back.id == 7 and back.job.prompt_ids == ids
    assert host_bytes(back.job.media["pixel_values"]) == host_bytes(pixels)
    assert back.job.media["pixel_values"].dtype == mx.bfloat16


@pytest.mark.parametrize("media, what", [
    ({"pixel_values": np.zeros((1, 2))}, "not an mx.array"),
    ({"pixel_values": mx.zeros((1, 2), mx.complex64)}, "dtype mlx.core.complex64"),
    ({"pixel_values": mx.array(1.0)}, "no item axis"),
])
def test_media_that_cannot_be_sent_is_refused(media, what):
    assert what in refusal(Job([2, 3], 2, media=media))


def test_media_longer_than_a_message_carries_is_refused(monkeypatch):
    monkeypatch.setattr(media_messages, "MAX_BYTES", 15)
    assert refusal(Job([2, 3], 2, media={"audio_mask": mx.ones((1, 15), mx.bool_)})) is None
    assert "a message carries 15 at most" in refusal(Job([2, 3], 2, media={"audio_mask": mx.ones((1, 16), mx.bool_)}))


@pytest.mark.parametrize("change, what", [
    (lambda d, blob: (d, blob[:-1]), "does not fit"),
    (lambda d, blob: (d, blob + b"x"), "past its arrays"),
    (lambda d, blob: ([{**d[0], "dtype": "object"}], blob), "describes an array"),
    (lambda d, blob: ([{**d[0], "shape": [3, 4]}], blob), "does not fit"),
    (lambda d, blob: (None, blob), "describes none"),
])
def test_a_payload_that_does_not_fit_its_description_is_an_error(change, what):
    described, blob = media_messages.encode({"audio_mask": mx.ones((2, 5), mx.bool_)})
    with pytest.raises(DistributedError, match=what):
        media_messages.decode(*change(described, blob))


def test_rank_0_sends_a_pipeline_follower_stand_ins_and_a_tensor_one_the_arrays(monkeypatch):
    """LeaderInbox (rank 0's) makes each job's payload with rank 0's model, which says what the followers read."""
    sent = []
    monkeypatch.setattr(messages, "_share", lambda group, header, payload=b"": sent.append(payload))
    media = gemma4_media(4, 1, 1)
    for strategy in ("pipeline", "tensor"):
        local = queue.Queue()
        local.put(("job", Row(1, Job([2, 3], 2, media=media), print, 2)))
        messages.LeaderInbox(local, None, _Model(strategy)).get()
    pipeline, tensor = (media_messages.decode(json.loads(t)["media"], blob)
                        for t, blob in map(media_messages.unframe, sent))
    assert all(pipeline[k].shape == (1, 32) and pipeline[k].dtype == mx.uint8 for k in media)
    assert len(sent[0]) < 1000 < sum(len(host_bytes(v)) for v in media.values())
    assert all(host_bytes(tensor[k]) == host_bytes(media[k]) and tensor[k].dtype == media[k].dtype for k in media)


# ----- two ranks -------------------------------------------------------------------------------

PALI = str(FIXTURES / "tiny_paligemma2")
VIDEO = dict(patch_size=4, max_soft_tokens=70, pooling_kernel_size=3, num_frames=4)  # as test_server_media_video.py


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Two images, a clip, a video and the tiny Gemma 4 with its video settings."""
    root = tmp_path_factory.mktemp("media")
    # red / white: the tiny Gemma 3 tells them apart (test_server.media_folder); noise 3 / 4 / white: the
    # tiny PaliGemma 2 and Gemma 4 do (test_server_media_paligemma.py, test_server_media.py)
    out = {"images": [root / f"{name}.png" for name in ("red", "white", "noise3", "noise4")], "clip": root / "clip.wav"}
    for path, raw in zip(out["images"], (solid_png((255, 0, 0)), solid_png((255, 255, 255)), noise_png(3), noise_png(4))):
        path.write_bytes(raw)
    out["clip"].write_bytes(wav_bytes())
    out["gemma4"] = root / "gemma4"  # the tiny Gemma 4 with both towers, taking 4 frames of a video
    shutil.copytree(GEMMA4, out["gemma4"])
    config = json.loads((out["gemma4"] / "processor_config.json").read_text())
    (out["gemma4"] / "processor_config.json").write_text(json.dumps({**config, "video_processor": VIDEO}))
    out["gemma4_split"] = splittable(out["gemma4"], root / "gemma4_split")
    out["video"] = root / "up.mp4"  # (PyAV is in the test extra)
    write_video(out["video"], np.load(FIXTURES / "gemma4_video.npz")["up_frames"], 8)
    return out


def splittable(folder: Path, out: Path) -> Path:
    """`folder` (the tiny Gemma 4, whose last 2 of 4 layers read layers 0-1's keys and values, so no
    pipeline cut exists) with no KV-shared layers: layers 2-3 get copies of layers 0-1's k / v weights.
    Another model, served by both sides of the comparison."""
    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["num_kv_shared_layers"] = 0
    (out / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(out / "model.safetensors"))
    prefix = "model.language_model.layers."
    for key in [k for k in weights if k.startswith(prefix) and (".self_attn.k" in k or ".self_attn.v_proj" in k)]:
        layer, rest = key[len(prefix):].split(".", 1)
        if int(layer) < 2:
            weights[f"{prefix}{int(layer) + 2}.{rest}"] = weights[key]
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


_LOADED: dict = {}


def reference(folder: str, messages, max_tokens: int, **media) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of one process's generate, stopping where the server stops."""
    if folder not in _LOADED:
        _LOADED[folder] = mlx_gemma.load(folder)
    model, tok = _LOADED[folder]
    stop = {} if model.prefix_lm else {"stop_token_ids": [tok.end_of_turn_id]}  # PaliGemma: no chat turns
    out = list(stream_generate(model, tok, messages, max_tokens=max_tokens, **stop, **media))
    return "".join(r.text for r in out), out[-1].finish_reason, len(out)


def ask(client, folder: str, messages, max_tokens: int, stream: bool = False):
    """(text, finish reason, tokens) of the server's greedy reply, and its usage (None when streamed)."""
    r = client.chat.completions.create(model=folder, messages=messages, max_tokens=max_tokens, temperature=0,
                                       stream=stream, **({"stream_options": {"include_usage": True}} if stream else {}))
    if not stream:
        return (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens), r.usage
    chunks = list(r)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
    return (text, finish, chunks[-1].usage.completion_tokens), None


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(path.read_bytes())}}


def audio_part(path: Path) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(path.read_bytes()).decode(), "format": "wav"}}


def check_gemma3(client, folder: str, files: dict) -> None:
    a, b = files["images"][:2]
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    want = reference(folder, asked, 10, image=[str(a)])
    assert want != reference(folder, asked, 10, image=[str(b)])  # the image matters
    sent = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "What?"}]}]
    assert ask(client, folder, sent, 10)[0] == want
    assert ask(client, folder, sent, 10, stream=True)[0] == want
    check_second_turn(client, folder, sent, asked, dict(image=[str(a)]))
    check_concurrent(client, folder, [{"role": "user", "content": [image_part(b), {"type": "text", "text": "What?"}]}],
                     asked, dict(image=[str(b)]))


def check_gemma4(client, folder: str, files: dict) -> None:
    a, clip = files["images"][2], files["clip"]
    asked = [{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe."}]}]
    media = dict(image=[str(a)], audio=[str(clip)])
    want = reference(folder, asked, 10, **media)
    assert want != reference(folder, asked, 10, image=[str(files["images"][1])], audio=[str(clip)])  # white
    sent = [{"role": "user", "content": [image_part(a), audio_part(clip), {"type": "text", "text": "Describe."}]}]
    assert ask(client, folder, sent, 10)[0] == want
    assert ask(client, folder, sent, 10, stream=True)[0] == want
    check_second_turn(client, folder, sent, asked, media)
    check_concurrent(client, folder, sent, asked, media)
    url = f"data:video/mp4;base64,{base64.b64encode(files['video'].read_bytes()).decode()}"
    sent = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": "What happens?"}]}]
    asked = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    assert ask(client, folder, sent, 8)[0] == reference(folder, asked, 8, video=[str(files["video"])])


def check_paligemma(client, folder: str, files: dict) -> None:
    """PaliGemma's prompt is the last user message's text and image (server/media.py)."""
    a, b = files["images"][2:]
    want = reference(folder, "caption en", 12, image=str(a))
    assert want != reference(folder, "caption en", 12, image=str(b))  # (as test_server_media_paligemma.py)
    sent = [{"role": "user", "content": [image_part(a), {"type": "text", "text": "caption en"}]}]
    assert ask(client, folder, sent, 12)[0] == want
    asks = [("caption en", b), ("answer en what is it?", a), ("caption es", None)]
    messages = [[{"role": "user", "content": [*([image_part(i)] if i else []), {"type": "text", "text": t}]}]
                for t, i in asks]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda m: ask(client, folder, m, 8)[0], messages))
    assert got == [reference(folder, t, 8, **({"image": str(i)} if i else {})) for t, i in asks]


def check_second_turn(client, folder: str, sent, asked, media: dict) -> None:
    """A second turn carrying the first's media reuses its prompt from the prefix cache (on both ranks
    alike, or they would fall out of step) and equals generate on the whole conversation."""
    first, usage = ask(client, folder, sent, 6)
    turns = lambda turn: [*turn, {"role": "assistant", "content": first[0]},  # noqa: E731
                          {"role": "user", "content": "And then?"}]
    second, second_usage = ask(client, folder, turns(sent), 6)
    assert second_usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens
    assert second == reference(folder, turns(asked), 6, **media)


def check_concurrent(client, folder: str, sent, asked, media: dict) -> None:
    """A media request and a text request at once: rows joining and leaving the batch on both ranks."""
    text = [{"role": "user", "content": "Count to 5, then stop."}]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda m: ask(client, folder, m[0], m[1])[0], [(sent, 9), (text, 12)]))
    assert got == [reference(folder, asked, 9, **media), reference(folder, text, 12)]


CHECKS = {"gemma3_vlm": (VLM3, check_gemma3), "paligemma2": (PALI, check_paligemma), "gemma4_mm": (None, check_gemma4)}


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks_serve_media_as_one_process(tmp_path, files, name, flag):
    folder, check = CHECKS[name]
    folder = folder or str(files["gemma4_split" if flag == "--pipeline" else "gemma4"])
    with serving(tmp_path, flag, folder) as (url, _):  # then SIGTERM: both ranks end with status 0, in step
        check(openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300), folder, files)
