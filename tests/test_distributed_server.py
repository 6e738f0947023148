"""The server across ranks (issue 23, mlx_gemma/distributed/serving.py): `mlx.launch -n 2 --backend ring`
on localhost runs `python -m mlx_gemma.server --pipeline` (and `--tensor-parallel`) through
tests/distributed_scripts/server_rank.py; rank 0 serves HTTP and rank 1 follows its batches.

Driven by the official `openai` client: greedy chat (streamed and not), two concurrent requests, a
seeded sampled completion, and requests after a cancelled stream and an unseeded sampled one
(the ranks still in step) all equal one process's `mlx_gemma.generate`, and so does a reply held
to a JSON grammar (more: test_distributed_server_grammar.py); the follower sleeps while the server
is idle; SIGTERM on rank 0 ends both ranks with status 0.  One launch per strategy: starting two
ranks costs tens of seconds here.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from conftest import FIXTURES

import mlx.core as mx

import mlx_gemma
from mlx_gemma.distributed.job_messages import check_served
from mlx_gemma.distributed.serving import LeaderScheduler
from mlx_gemma.errors import DistributedError, GenerationError
from mlx_gemma.generate import stream_generate
from mlx_gemma.grammar import json_constraint
from mlx_gemma.jobs import Job
from mlx_gemma.samplers import SamplingSettings, make_sampler
from mlx_gemma.server.cli import build_parser

SCRIPT = Path(__file__).parent / "distributed_scripts" / "server_rank.py"
MLX_LAUNCH = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
FOLDER = str(FIXTURES / "tiny_gemma3")
START_TIMEOUT = 600  # seconds: two ranks importing MLX, mlx_gemma and FastAPI on a busy machine
MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def launch(folder: Path, flag: str, model: str = FOLDER, extra: tuple = ()):
    """(mlx.launch's process, the base URL, {rank: pid}) once rank 0 answers /health; the server serves
    `model` with `extra` arguments."""
    port, ring = free_port(), str(20_000 + (os.getpid() * 7 + time.monotonic_ns() // 1000) % 20_000)
    cmd = [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", ring, sys.executable, str(SCRIPT),
           str(folder), "--model", model, flag, "--port", str(port), "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(cmd, stdout=open(folder / "out.log", "w"), stderr=open(folder / "err.log", "w"),
                            cwd=Path(__file__).parent.parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        end(proc, folder)
        raise AssertionError(f"the server did not start: {logs(folder)}")
    pids = {r: int((folder / f"rank{r}.pid").read_text()) for r in (0, 1)}
    return proc, url, pids


def end(proc, folder: Path) -> None:
    """Kill the ranks that wrote their pid, then mlx.launch (killing it alone leaves the ranks running)."""
    for pid_file in folder.glob("rank*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    proc.kill()


def logs(folder: Path) -> str:
    return (folder / "out.log").read_text()[-2000:] + (folder / "err.log").read_text()[-3000:]


@contextlib.contextmanager
def serving(folder: Path, flag: str, *args):
    """launch's (base URL, {rank: pid}) for the block (`args`: launch's others); after it SIGTERM on
    rank 0 must end both ranks with status 0 and no error line (so they were still in step).  A failed
    check kills both ranks."""
    proc, url, pids = launch(folder, flag, *args)
    try:
        yield url, pids
        os.kill(pids[0], signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # a failed check
            end(proc, folder)
    text = logs(folder)
    assert [(folder / f"rank{r}.exit").read_text() for r in (0, 1)] == ["0", "0"], text
    assert "exited with code" not in text and "error" not in text, text


def reference(loaded, messages, max_tokens: int, sampler=None) -> tuple[str, str, int]:
    """(text, finish reason, tokens) of one process's generate on the chat, stopping at the turn's end
    as the server does."""
    model, tok = loaded
    out = list(stream_generate(model, tok, messages, max_tokens=max_tokens, chat=True,
                               stop_token_ids=[tok.end_of_turn_id], sampler=sampler))
    return "".join(r.text for r in out), out[-1].finish_reason, len(out)


def chat(client, messages, max_tokens: int, **kw) -> tuple[str, str, int]:
    r = client.chat.completions.create(model=FOLDER, messages=messages, max_tokens=max_tokens, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens


@pytest.fixture(scope="module")
def gemma3():
    return mlx_gemma.load(FOLDER)


@pytest.mark.parametrize("extra,what", [(["--model", FOLDER], "serving several models")])
def test_what_cannot_run_across_ranks_is_refused_at_start(extra, what):
    args = build_parser().parse_args(["--model", FOLDER, "--pipeline", *extra])
    with pytest.raises(DistributedError, match=re.escape(what) + ".*is not served across ranks"):
        check_served(args)


@pytest.mark.parametrize("extra", [["--prompt-lookup", "2"], ["--draft-model", FOLDER, "--num-draft-tokens", "2"]])
def test_speculation_flags_are_served_across_ranks(extra):
    """(the ranks speculate with rank 0's proposals: test_distributed_server_speculation.py)"""
    check_served(build_parser().parse_args(["--model", FOLDER, "--tensor-parallel", *extra]))


def test_rank_0_refuses_what_the_followers_cannot_run_and_runs_the_rest(gemma3):
    """Rank 0's scheduler in a one-rank group (this process): its messages go to no follower."""
    model, tok = gemma3
    group = mx.distributed.init()
    if group.size() != 1:
        pytest.skip("run inside mlx.launch")  # pytest itself is never launched so: this never skips in CI
    scheduler = LeaderScheduler(model, group)
    ids = tok.encode("The sky is", add_bos=True)
    refused = [Job(ids, 4, media={"pixel_values": [[0.0]]}), Job(ids, 4, processors=(lambda h, x: x,)),
               Job(ids, 4, speculation={"prompt_lookup": 2})]
    for job, what in zip(refused, ["not an mx.array", "grammar", "SpeculationAsk"]):
        with pytest.raises(GenerationError, match=re.escape(what) + ".*is not served across ranks"):
            scheduler.submit(job, lambda event: None)
    events = []
    scheduler.start()
    try:
        scheduler.submit(Job(ids, 6, SamplingSettings(temp=0.8, seed=5)), events.append)
        deadline = time.monotonic() + 60
        while not (events and events[-1].finish_reason) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.close()
    want = [o.token for o in stream_generate(model, tok, "The sky is", max_tokens=6, sampler=make_sampler(0.8, seed=5))]
    assert [e.token for e in events] == want


@pytest.mark.parametrize("flag", ["--pipeline", "--tensor-parallel"])
def test_two_ranks_serve_what_one_process_generates(tmp_path, flag, gemma3):
    with serving(tmp_path, flag) as (url, pids):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        # greedy, not streamed and streamed
        assert chat(client, MESSAGES, 10, temperature=0) == reference(gemma3, MESSAGES, 10)
        stream = client.chat.completions.create(model=FOLDER, messages=MESSAGES, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
            reference(gemma3, MESSAGES, 8)[0]
        # two at once: rows joining and leaving the batch on both ranks
        prompts = [[{"role": "user", "content": f"Count to {i}, then stop."}] for i in (3, 7)]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda i: chat(client, prompts[i], 5 + 4 * i, temperature=0), (0, 1)))
        assert got == [reference(gemma3, prompts[i], 5 + 4 * i) for i in (0, 1)]
        # a seeded sampled reply draws what one process draws with that seed
        r = client.completions.create(model=FOLDER, prompt="The sky is", max_tokens=6, temperature=0.8, seed=5)
        model, tok = gemma3
        want = "".join(o.text for o in stream_generate(model, tok, "The sky is", max_tokens=6,
                                                       sampler=make_sampler(0.8, seed=5)))
        assert r.choices[0].text == want
        # an unseeded sampled reply (rank 0 draws its seed) and a stream the client leaves early:
        # the ranks are still in step afterwards
        chat(client, MESSAGES, 4, temperature=1.0)
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=300,
                          json={"model": FOLDER, "messages": MESSAGES, "max_tokens": 60, "stream": True}) as s:
            next(s.iter_lines())
        r = client.chat.completions.create(model=FOLDER, messages=prompts[1], max_tokens=6, temperature=0)
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == \
            reference(gemma3, prompts[1], 6)
        assert r.usage.prompt_tokens_details.cached_tokens > 0  # the prefix cache, agreed by both ranks
        # a reply held to a grammar (each rank its own constraint) equals one process's under that grammar
        want = "".join(o.text for o in stream_generate(model, tok, MESSAGES, max_tokens=24, chat=True,
                                                       stop_token_ids=[tok.end_of_turn_id],
                                                       logits_processors=[json_constraint(tok, {"type": "json_object"})]))
        assert chat(client, MESSAGES, 24, temperature=0, response_format={"type": "json_object"})[0] == want
        # idle: the follower sleeps between rank 0's messages instead of polling inside a collective
        time.sleep(1.0)
        before = cpu_seconds(pids[1])
        time.sleep(3.0)
        assert cpu_seconds(pids[1]) - before < 0.6, "the follower is busy while the server is idle"
