"""A failure on one rank only, while serving across ranks (issue 23, mlx_gemma/distributed/failures.py):
every rank ends the same rows at the same step, so the ranks stay in step.

In this process: the reports' encoding, and a scheduler with the meetings in a one-rank group (a row
whose processor raises ends with an error while a concurrent row draws what generate draws, a broken
callback, the loop raising while it reads a step).  Across 2 ranks (`mlx.launch`, one
launch per strategy): tests/distributed_scripts/server_faults.py injects failures on one rank; driven by the official
`openai` client, a request failing on rank 0 only and one failing on rank 1 only get an error while a
concurrent request and a later one equal one process's generate; the loop failing on rank 1 while it
reads a step fails every current request and the server goes on; a prompt's forward pass failing on
rank 1 ends both ranks with an error line and a non-zero status, without a hang.  (Rank 1 dying is
test_distributed_pipeline's.)
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import test_distributed_server as served

import mlx.core as mx

import mlx_gemma
from mlx_gemma.batching import Scheduler
from mlx_gemma.distributed.failures import EVERY_JOB, SharedFailures, decode_reports, encode_report
from mlx_gemma.errors import DistributedError
from mlx_gemma.generate import stream_generate
from mlx_gemma.jobs import Job

FAULTS = Path(__file__).parent / "distributed_scripts" / "server_faults.py"


def test_reports_round_trip_rank_by_rank():
    reports = [[(3, "internal error (ValueError)")], [], [(EVERY_JOB, "rank text: ünïcode ✓"), (7, "x")]]
    blobs = [encode_report(r) for r in reports]
    assert blobs[1] == b""
    got = decode_reports([len(b) for b in blobs], b"".join(blobs))
    assert got == [(0, 3, "internal error (ValueError)"), (2, EVERY_JOB, "rank text: ünïcode ✓"), (2, 7, "x")]


def test_reports_that_do_not_fit_are_a_distributed_error():
    blob = encode_report([(1, "a")])
    with pytest.raises(DistributedError, match="does not fit"):
        decode_reports([len(blob) + 1], blob)
    with pytest.raises(DistributedError, match="rank 1's failure report does not decode"):
        decode_reports([0, 3], b"[[1")


@pytest.fixture(scope="module")
def gemma3():
    return mlx_gemma.load(served.FOLDER)


def _group():
    group = mx.distributed.init()
    if group.size() != 1:
        pytest.skip("run inside mlx.launch")  # pytest itself is never launched so: this never skips in CI
    return group


def _wait(events: list, n: int = 1) -> None:
    deadline = time.monotonic() + 120
    while sum(1 for e in events if e.finish_reason) < n and time.monotonic() < deadline:
        time.sleep(0.01)


def _raises_at(k: int):
    """A logits processor that raises at its k-th call."""
    calls = [0]

    def processor(history, logits):
        calls[0] += 1
        if calls[0] == k:
            raise ValueError("injected")
        return logits

    return processor


def test_a_row_failing_here_ends_at_the_next_meeting_and_the_others_go_on(gemma3):
    model, tok = gemma3
    scheduler = Scheduler(model)
    scheduler._policy.ranks = failures = SharedFailures(_group())
    ids = tok.encode("The sky is", add_bos=True)
    want = [o.token for o in stream_generate(model, tok, "The sky is", max_tokens=8)]
    failing, other, broken = [], [], []

    def breaks(event):
        broken.append(event)
        if len(broken) == 2:
            raise RuntimeError("the client went away")

    scheduler.start()
    try:
        scheduler.submit(Job(ids, 8, processors=(_raises_at(3),)), failing.append)
        scheduler.submit(Job(ids, 8), other.append)
        scheduler.submit(Job(ids, 8), breaks)
        _wait(failing), _wait(other)
        deadline = time.monotonic() + 30
        while scheduler.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert scheduler.active == 0  # every job counted out once, the broken one included
    finally:
        scheduler.close()
    assert [e.token for e in failing[:-1]] == want[:2]
    assert (failing[-1].finish_reason, failing[-1].error) == ("error", "internal error (ValueError)")
    assert [e.token for e in other] == want and other[-1].finish_reason == "length"
    assert [e.token for e in broken] == want[:2]  # nothing after the callback failed
    assert failures.pending == [] and failures.rows == {}


def test_the_loop_failing_between_steps_fails_every_job_at_the_next_meeting(gemma3):
    model, tok = gemma3
    scheduler = Scheduler(model)
    scheduler._policy.ranks = SharedFailures(_group())
    policy, plain_read, reads = scheduler._policy, scheduler._policy.read, [0]

    def read(step, n):  # the host reading a step: outside every collective
        reads[0] += 1
        if reads[0] == 4:
            raise RuntimeError("injected")
        return plain_read(step, n)

    policy.read = read
    ids = tok.encode("The sky is", add_bos=True)
    first, second, later = [], [], []
    scheduler.start()
    try:
        scheduler.submit(Job(ids, 30), first.append)
        scheduler.submit(Job(ids, 30), second.append)
        _wait(first), _wait(second)
        scheduler.submit(Job(ids, 6), later.append)
        _wait(later)
    finally:
        scheduler.close()
    for events in (first, second):
        assert (events[-1].finish_reason, events[-1].error) == ("error", "internal error (RuntimeError)")
    want = [o.token for o in stream_generate(model, tok, "The sky is", max_tokens=6)]
    assert [e.token for e in later] == want


def _request(client, content: str, max_tokens: int):
    """(text, finish reason, tokens) of a greedy chat, or the error the client raised."""
    try:
        return served.chat(client, [{"role": "user", "content": content}], max_tokens, temperature=0)
    except openai.APIError as e:
        return e


WATCHDOG_SECONDS = 30  # far above a tiny model's step on 2 ranks, even on a loaded CI machine


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_a_failure_on_one_rank_ends_that_request_on_every_rank(tmp_path, gemma3, monkeypatch, flag):
    monkeypatch.setattr(served, "SCRIPT", FAULTS)
    # Under tensor parallel, MLX 0.32's ring backend can leave rank 0's next all_sum waiting for ever once
    # its peer is gone (seen: the all_reduce's wait after "Failing pending tasks"); the watchdog then ends
    # it, after this many seconds without progress, which the test waits for.
    monkeypatch.setenv("MLX_GEMMA_DISTRIBUTED_TIMEOUT", str(WATCHDOG_SECONDS))
    proc, url, pids = served.launch(tmp_path, flag)
    prompts = ["Count to 3, then stop.", "Name a color.", "Why is the sky blue?"]
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def want(i, n):
            return served.reference(gemma3, [{"role": "user", "content": prompts[i]}], n)

        for fails, rank in ((13, "rank 0"), (14, "rank 1")):
            # (fails: the max_tokens server_faults.py makes fail on that rank alone)
            with ThreadPoolExecutor(2) as pool:
                bad, good = pool.map(lambda a: _request(client, *a), [(prompts[0], fails), (prompts[1], 12)])
            assert isinstance(bad, openai.InternalServerError), (rank, bad)
            text = "rank 1: internal error (ValueError)" if fails == 14 else "internal error (ValueError)"
            assert f"the generation failed: {text}" in str(bad), (rank, bad)
            assert good == want(1, 12), rank
            assert _request(client, prompts[2], 7) == want(2, 7), rank  # the ranks still in step
        # the loop failing on rank 1 while it reads a step: every current request fails, the server goes on
        with ThreadPoolExecutor(2) as pool:
            bad, other = pool.map(lambda a: _request(client, *a), [(prompts[0], 15), (prompts[1], 40)])
        for e in (bad, other):
            assert isinstance(e, openai.InternalServerError) and "rank 1: internal error (RuntimeError)" in str(e), e
        assert _request(client, prompts[1], 9) == want(1, 9)
        # a prompt's forward pass failing on rank 1: both ranks end, with an error line, without a hang
        assert isinstance(_request(client, prompts[2], 16), openai.APIError)
        proc.wait(timeout=2 * WATCHDOG_SECONDS)
    finally:
        if proc.poll() is None:
            served.end(proc, tmp_path)
    # whole logs: under tensor parallel uvicorn's cancelled stream prints a long traceback (server side only)
    text = (tmp_path / "out.log").read_text() + (tmp_path / "err.log").read_text()
    assert "error: distributed: rank 1: the serving loop failed inside a step (RuntimeError" in text, text
    lost = r"error: distributed: rank 0: .*(lost|failed)"
    timed_out = rf"error: distributed: no progress for {WATCHDOG_SECONDS} s while serving"
    assert re.search(lost, text) or (flag == "--tensor-parallel" and re.search(timed_out, text)), text
    assert not any((tmp_path / f"rank{r}.exit").exists() for r in (0, 1)), text  # both ended by os._exit
    assert re.search(r"rank 1 exited with code 3", text), text
