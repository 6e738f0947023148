"""A job as rank 0 sends it to the followers when serving across ranks (issue 23): what a job may
hold to be sent (`refusal`), its payload (JSON bytes), and a follower's copy of it; and what the
server cannot serve across ranks at all (`check_served`, before anything is loaded).

A grammar-constrained reply (response_format json_object / json_schema, forced tool calls) travels
as its grammar, from which each follower builds its own constraint (processor_messages.py).
A prompt's images, audio and video travel as arrays (media_messages.py: whole under tensor parallel,
where every rank runs the towers; under pipeline only what the later stages read).
A request's speculation fields travel as they came (the ranks speculate with rank 0's proposals:
speculation.py).  Not sent (a 400 naming it): a job's logits processor that is not one of the
server's grammar constraints (a Python callable).  An embedding model and several --model are
refused at start.
"""

from __future__ import annotations

import dataclasses
import json

from ..batch_speculation import SpeculationAsk
from ..errors import DistributedError
from ..jobs import Job, Row, check_job
from ..samplers import SamplingSettings
from . import media_messages, processor_messages

NOT_ACROSS = "is not served across ranks (--pipeline / --tensor-parallel)"


def refusal(job: Job) -> str | None:
    """Why `job` cannot be sent to the followers (a message for a 400), or None."""
    why = media_messages.refusal(job.media)  # arrays of a dtype sent (media_messages.py)
    if why is not None:
        return f"{why} {NOT_ACROSS}"
    why = processor_messages.refusal(job.processors)
    if why is not None:
        return f"{why} {NOT_ACROSS}"
    if job.speculation is not None and not isinstance(job.speculation, SpeculationAsk):
        return f"Job.speculation other than a SpeculationAsk (a {type(job.speculation).__name__}) {NOT_ACROSS}"
    return None


def job_payload(row: Row, model=None) -> bytes:
    """The job as sent: JSON, then its media's bytes; `model` (rank 0's) says which media the followers
    read (media_messages.py; without it every array goes whole)."""
    job = row.job
    sampling = {f.name: getattr(job.sampling, f.name) for f in dataclasses.fields(SamplingSettings)}
    if sampling["logit_bias"] is not None:
        sampling["logit_bias"] = [[int(k), float(v)] for k, v in sampling["logit_bias"].items()]
    media, blob = media_messages.encode(job.media, media_messages.stand_ins(model))
    text = json.dumps({"id": row.id, "prompt_ids": [int(t) for t in job.prompt_ids], "max_tokens": job.max_tokens,
                       "sampling": sampling, "stop_ids": sorted(int(t) for t in job.stop_ids),
                       "top_logprobs": job.top_logprobs,
                       "processors": processor_messages.describe(job.processors),
                       "speculation": None if job.speculation is None else dataclasses.asdict(job.speculation),
                       "media": media}).encode()
    return media_messages.frame(text, blob)


def row_from(model, payload: bytes, tokenizer=None) -> Row:
    """A follower's copy of rank 0's job (its events go nowhere); its grammar constraints are built
    with `tokenizer` (this rank's)."""
    text, blob = media_messages.unframe(payload)
    d = json.loads(text)
    sampling = d["sampling"]
    if sampling["logit_bias"] is not None:
        sampling["logit_bias"] = {int(k): v for k, v in sampling["logit_bias"]}
    job = Job(prompt_ids=d["prompt_ids"], max_tokens=d["max_tokens"], sampling=SamplingSettings(**sampling),
              stop_ids=frozenset(d["stop_ids"]), top_logprobs=d["top_logprobs"],
              processors=processor_messages.rebuild(d["processors"], tokenizer),
              speculation=None if d["speculation"] is None else SpeculationAsk(**d["speculation"]),
              media=media_messages.decode(d["media"], blob))
    return Row(d["id"], job, _ignore, check_job(model, job, _ignore))


def _ignore(event) -> None:
    """A follower's jobs report nothing: rank 0 answers the clients."""




def check_served(args) -> None:
    """What the server cannot serve across ranks, refused before anything is loaded."""
    if len(args.model) != 1:
        raise DistributedError(f"serving several models {NOT_ACROSS}: give one --model")
