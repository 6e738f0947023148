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
reuses it from the prefix cache (cached_tokens) on both ranks alike and still equals generate.
"""

from __future__ import annotations

import hashlib
import json
import queue

import mlx.core as mx
import numpy as np
import pytest
from test_server import VLM3

import mlx_gemma
from mlx_gemma.distributed import media_messages, messages
from mlx_gemma.distributed.job_messages import job_payload, refusal, row_from
from mlx_gemma.errors import DistributedError
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
