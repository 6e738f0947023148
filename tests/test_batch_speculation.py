"""mlx_gemma/batch_speculation.py in process: a Scheduler whose row, alone, speculates.

Reference: plain greedy `stream_generate` (no speculation, no batch; checked against transformers in
test_generate).  The draft is the target itself, so every proposal is kept and the counts follow from
the script.  A scripted controller speculates for two steps and then runs plain steps, which must be
pipelined (queued before the host reads the step before) while the row is alone; a second job arriving
then makes the row rejoin the batch with a token the host has not read yet.  The tiny Gemma 3's window
(5) is far shorter than the texts.
"""

from __future__ import annotations

import functools
import threading

import pytest
from conftest import FIXTURES
from test_speculative_adaptive import Scripted  # plans k from a script, then 0 (speculation off)

from mlx_gemma import speculative
from mlx_gemma.batch_speculation import SpeculationAsk, SpeculativeBatchPolicy, resolve
from mlx_gemma.batching import Job, Scheduler
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_generate
from mlx_gemma.loading import load
from mlx_gemma.proposers import Speculation

PROMPT = [2, 17, 17, 40, 41, 17, 17, 9, 17, 17, 40, 33, 34, 17, 17]
OTHER = [2, 9, 10, 11, 17, 17]


class Spy(SpeculativeBatchPolicy):
    """Records, at each of the engine's checks, whether a row was alone and whether the step was pipelined."""

    seen: list = []

    @property
    def pipelined(self) -> bool:
        value = super().pipelined
        Spy.seen.append((self.alone is not None, value))
        return value


@pytest.fixture(scope="module")
def gemma3():
    return load(FIXTURES / "tiny_gemma3")


def plain(loaded, ids, n):
    model, tok = loaded
    return [r.token for r in stream_generate(model, tok, ids, max_tokens=n)]


def test_alone_then_plain_pipelined_then_joined(gemma3, monkeypatch):
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: Scripted([3, 3]))
    model, tok = gemma3
    Spy.seen = []
    scheduler = Scheduler(model, policy=functools.partial(Spy, speculation=Speculation(gemma3, None, 3)))
    scheduler.start()
    events = {"first": [], "second": []}
    done = {name: threading.Event() for name in events}

    def collect(name):
        def on_event(e):
            events[name].append(e)
            if name == "first" and len(events["first"]) == 12:  # well into its plain, pipelined steps
                scheduler.submit(Job(OTHER, 12), collect("second"))
            if e.finish_reason is not None:
                done[name].set()
        return on_event

    try:
        scheduler.submit(Job(PROMPT, 28), collect("first"))
        assert done["first"].wait(120) and done["second"].wait(120)
    finally:
        scheduler.close()
    first, second = events["first"], events["second"]
    assert [e.token for e in first] == plain(gemma3, PROMPT, 28)
    assert [e.token for e in second] == plain(gemma3, OTHER, 12)
    assert first[-1].speculative == (6, 6)  # two verify steps of 3 proposals, every one kept
    assert second[-1].speculative is None  # its script had run out: it never verified
    assert (True, True) in Spy.seen and (True, False) in Spy.seen  # alone: plain steps pipelined, verify steps not


def test_a_job_that_does_not_ask_runs_plain(gemma3):
    model, _ = gemma3
    scheduler = Scheduler(model, policy=functools.partial(SpeculativeBatchPolicy, speculation=None))
    scheduler.start()
    events, done = [], threading.Event()

    def on_event(e):
        events.append(e)
        if e.finish_reason is not None:
            done.set()

    try:
        scheduler.submit(Job(PROMPT, 20), on_event)
        assert done.wait(60)
        assert scheduler._policy.steps == {} and scheduler._policy.alone is None  # nothing kept per job
    finally:
        scheduler.close()
    assert [e.token for e in events] == plain(gemma3, PROMPT, 20) and events[-1].speculative is None


def test_resolve():
    draft = Speculation("draft", None, 4)
    lookup = Speculation(None, 2, 3)
    assert resolve(None, None) is None
    assert resolve(draft, None) == draft
    assert resolve(draft, SpeculationAsk(num_draft_tokens=0)) is None
    assert resolve(draft, SpeculationAsk(num_draft_tokens=2)) == Speculation("draft", None, 2)
    assert resolve(draft, SpeculationAsk(prompt_lookup=True)) == Speculation(None, 3, 4)
    assert resolve(draft, SpeculationAsk(prompt_lookup=False)) == draft  # lookup off: the draft stays
    assert resolve(lookup, SpeculationAsk(prompt_lookup=False)) is None
    assert resolve(lookup, SpeculationAsk(prompt_lookup=5)) == Speculation(None, 5, 3)
    assert resolve(None, SpeculationAsk(prompt_lookup=True, num_draft_tokens=2)) == Speculation(None, 3, 2)
    assert resolve(None, SpeculationAsk(num_draft_tokens=2)) is None  # nothing to propose: mlx-lm ignores it
    for bad in (dict(num_draft_tokens=-1), dict(num_draft_tokens=True), dict(prompt_lookup=0), dict(prompt_lookup="2")):
        with pytest.raises(GenerationError):
            SpeculationAsk(**bad)
    with pytest.raises(GenerationError, match="SpeculationAsk"):
        resolve(None, {"num_draft_tokens": 3})
