"""Speculative decoding on the server across ranks (issue 23 with issue 22: distributed/speculation.py).

In this process (fast): a job's speculation fields survive its payload; rank 0's batch policy
(RankSpeculation with LeaderStep) gives the tokens and the (proposed, accepted) counts of one process's
SpeculativeBatchPolicy, and a follower's (FollowerStep), fed only the messages rank 0's shared (recorded,
then replayed in order), takes every step rank 0 took and draws the same tokens -- for a draft that is
not the target (tiny Gemma 2 drafting for tiny Gemma 3: rejections happen), greedy and sampled (there
the rejection rule reads the draft's q, which the follower never sees), and for prompt lookup.

Through the real server (`mlx.launch -n 2 --backend ring`, rank 0 serving HTTP, one launch per strategy,
driven by the official `openai` client): greedy replies with the server's draft model and with a
request's prompt_lookup equal one process's `generate` token for token, their `usage.speculative`
equals the single-process server's (same flags), seeded sampled replies equal the single-process
server's, and later requests (two at once, then one alone) still equal generate: the ranks stayed in
step.  Every server runs k proposals every step (FixedK, patched in by a sitecustomize as
test_server_speculative does), since the adaptive controller's choices follow the machine's timings.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import FIXTURES
from test_distributed_server import serving
from test_server import reference, start_server, stop_server
from test_server_speculative import FIXED_K

import mlx_gemma
from mlx_gemma import speculative
from mlx_gemma.batch_speculation import SpeculationAsk, SpeculativeBatchPolicy
from mlx_gemma.batching import Scheduler
from mlx_gemma.distributed import job_messages
from mlx_gemma.distributed.speculation import ON_RANK_ZERO, RankSpeculation
from mlx_gemma.jobs import Job, Row
from mlx_gemma.proposers import Speculation
from mlx_gemma.samplers import SamplingSettings
from mlx_gemma.speculative_control import FixedK

TARGET = str(FIXTURES / "tiny_gemma3")
DRAFT = str(FIXTURES / "tiny_gemma2")  # the same tokenizer, other weights: proposals get rejected
QUOTE = "Repeat after me: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."
MESSAGES = [{"role": "user", "content": QUOTE}]


@pytest.fixture(scope="module")
def target():
    return mlx_gemma.load(TARGET)


@pytest.fixture(scope="module")
def draft():
    return mlx_gemma.load(DRAFT)


@pytest.mark.parametrize("ask", [None, SpeculationAsk(), SpeculationAsk(2, True), SpeculationAsk(None, 3),
                                 SpeculationAsk(0, False)])
def test_a_jobs_speculation_fields_travel_in_its_payload(target, ask):
    model, _ = target
    row = Row(1, Job([2, 3, 4], 5, speculation=ask), lambda e: None, 5)
    assert job_messages.row_from(model, job_messages.job_payload(row, model)).job.speculation == ask
    assert job_messages.refusal(row.job) is None
    assert "SpeculationAsk" in job_messages.refusal(Job([2], 3, speculation={"prompt_lookup": 2}))


class _Recorder:
    """Rank 0's channel in one process: keeps what it would share."""

    leader = True

    def __init__(self):
        self.sent: list[list[int]] = []

    def share(self, values, size):
        got = [*values, *[0] * (size - len(values))]
        self.sent.append(got)
        return got


class _Replayer:
    """A follower's channel in one process: gives back rank 0's messages in order."""

    leader = False

    def __init__(self, sent):
        self.sent, self.taken = sent, 0

    def share(self, values, size):
        assert values is None and len(self.sent[self.taken]) == size
        self.taken += 1
        return self.sent[self.taken - 1]


def _serve(model, policy, jobs) -> list[list]:
    """Each job's events, the jobs run one after another on a scheduler with `policy`."""
    scheduler = Scheduler(model, policy=policy)
    scheduler.start()
    out = []
    try:
        for job in jobs:
            events = []
            scheduler.submit(job, events.append)
            deadline = time.monotonic() + 120
            while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert events and events[-1].finish_reason in ("stop", "length"), events[-1:]
            out.append(events)
    finally:
        scheduler.close()
    return out


def test_rank_policies_follow_rank_0_and_equal_one_process(target, draft, monkeypatch):
    monkeypatch.setattr(speculative, "Adaptive", lambda k, **_: FixedK(k))
    model, tok = target
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    stop = frozenset({tok.end_of_turn_id})
    jobs = [Job(ids, 30, stop_ids=stop),  # the server's draft, greedy
            Job(ids, 30, SamplingSettings(temp=1.0, seed=3), stop_ids=stop),  # sampled: rank 0 shares its outcome
            Job(ids, 30, stop_ids=stop, speculation=SpeculationAsk(prompt_lookup=2)),  # lookup in place of the draft
            Job(ids, 30, SamplingSettings(temp=0.8, seed=7), stop_ids=stop, speculation=SpeculationAsk(3, 2))]
    one = _serve(model, functools.partial(SpeculativeBatchPolicy, speculation=Speculation(draft, None, 3)), jobs)
    channel = _Recorder()
    leader = _serve(model, functools.partial(RankSpeculation, speculation=Speculation(draft, None, 3),
                                             channel=channel), jobs)
    replay = _Replayer(channel.sent)
    follower = _serve(model, functools.partial(RankSpeculation, speculation=Speculation(ON_RANK_ZERO, None, 3),
                                               channel=replay), jobs)
    for a, b, c in zip(one, leader, follower):
        assert [e.token for e in b] == [e.token for e in a] == [e.token for e in c]
        assert b[-1].speculative == a[-1].speculative == c[-1].speculative and a[-1].speculative[0] > 0
    assert one[0][-1].speculative[1] < one[0][-1].speculative[0]  # the draft is not the target: some rejected
    assert replay.taken == len(channel.sent)
    assert any(m[1] == 1 for m in channel.sent)  # proposals drawn from the draft's q: outcome messages sent


# ----- through the real server -------------------------------------------------------------------------

SERVER_FLAGS = ("--draft-model", DRAFT, "--num-draft-tokens", "3")
OTHER = [{"role": "user", "content": "Count to 7, then stop."}]


@pytest.fixture(scope="module")
def fixed_k(tmp_path_factory) -> str:
    """A PYTHONPATH whose sitecustomize gives every server FixedK."""
    folder = tmp_path_factory.mktemp("fixed_k")
    (folder / "sitecustomize.py").write_text(FIXED_K)
    return os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])


def _ask(client, messages, max_tokens=40, temperature=0, **extra):
    """(text, finish reason, usage.speculative) of a chat completion."""
    r = client.chat.completions.create(model=TARGET, messages=messages, max_tokens=max_tokens,
                                       temperature=temperature, extra_body=extra or None)
    return r.choices[0].message.content, r.choices[0].finish_reason, (r.usage.model_extra or {}).get("speculative")


REQUESTS = {  # what each check asks; the single-process server answers them all first
    "draft": dict(messages=MESSAGES),
    "lookup": dict(messages=MESSAGES, prompt_lookup=2),
    "draft sampled": dict(messages=MESSAGES, temperature=1.0, seed=3),
    "lookup sampled": dict(messages=MESSAGES, temperature=0.8, seed=5, prompt_lookup=2),
}


@pytest.fixture(scope="module")
def one_process(fixed_k):
    """The single-process server's replies to REQUESTS (same flags, FixedK)."""
    proc, url = start_server("--model", TARGET, *SERVER_FLAGS, env={"PYTHONPATH": fixed_k}, timeout=300)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        return {name: _ask(client, **kw) for name, kw in REQUESTS.items()}
    finally:
        stop_server(proc)


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_two_ranks_speculate_as_one_process(tmp_path, flag, target, one_process, fixed_k, monkeypatch):
    greedy = reference(target, MESSAGES, 40, chat=True)
    assert one_process["draft"][0] == one_process["lookup"][0] == greedy.text  # (speculation keeps greedy's tokens)
    monkeypatch.setenv("PYTHONPATH", fixed_k)  # (mlx.launch's ranks inherit it)
    with serving(tmp_path, flag, TARGET, SERVER_FLAGS) as (url, _):  # then both ranks end with status 0
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        got = {name: _ask(client, **kw) for name, kw in REQUESTS.items()}
        assert got == one_process  # texts, finish reasons and (proposed, accepted), greedy and seeded
        assert all(got[name][2]["proposed"] > 0 for name in REQUESTS)
        assert got["draft"][2]["accepted"] < got["draft"][2]["proposed"]  # rejections happened
        assert any(got[name][2]["accepted"] > 0 for name in REQUESTS)  # and acceptances
        # in step afterwards: two at once (the speculating row rejoins the batch), then one alone
        with ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda m: _ask(client, m, 24)[:2], (MESSAGES, OTHER)))
        assert both == [(r.text, r.finish) for r in (reference(target, m, 24, chat=True) for m in (MESSAGES, OTHER))]
        other = reference(target, OTHER, 12, chat=True)
        assert _ask(client, OTHER, 12, prompt_lookup=1)[:2] == (other.text, other.finish)
