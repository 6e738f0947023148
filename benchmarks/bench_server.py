"""Serving speed: `python -m mlx_gemma.server` against `mlx_lm.server` on the same folder, on loopback.

Each server runs alone, in a process group of its own on a free loopback port, and is torn
down (the whole group) before the other starts; the two alternate over the repetitions
(ours, mlx-lm, ours, mlx-lm, ...).  After a warm-up request, the official `openai` client
(async, streaming, `stream_options.include_usage`) drives it:

* **Throughput:** a fixed set of requests (prompts of mixed lengths, `--max-tokens` and half
  of it, greedy) sent by 1 and by 8 concurrent clients (`--clients`) that take requests from one
  queue: aggregate generated tokens/s (the usage's completion tokens over the wall time of the
  whole set), median and p95 time to first token (request sent to the first chunk with text).
  The end-of-turn and end-of-sequence ids get `logit_bias` -100 in both, so every request makes
  exactly its max_tokens.  Each prompt starts with a tag unique to the run, so no server reuses
  an earlier run's prompt cache here.
* **A 4-turn chat** on a Gemma 2-shaped model whose sliding window (`--chat-window`) is shorter
  than the conversation: each turn sends the whole conversation so far, the replies as that
  server streamed them.  Prompt tokens processed per turn are `usage.prompt_tokens -
  usage.prompt_tokens_details.cached_tokens` for both servers (mlx-lm 0.32 reports
  `cached_tokens` in its usage: the prefix its prompt cache reused; a server that reports no
  details counts as nothing reused).  mlx-lm 0.32's Gemma 2 attends globally (no window: see the
  README's "Gemma 2 sliding window"), so its cache there is a plain, trimmable KV cache.

mlx-lm is given Gemma's turn format as `--chat-template` (our folders carry only
tokenizer.model, and without a template mlx-lm joins messages in a format of its own); the
prompt token counts of both servers are reported side by side to show that the prompts agree.

    python benchmarks/bench_server.py                               # 270M bf16 and 4-bit; the chat on 2B
    python benchmarks/bench_server.py --models 270m-4bit --clients 8 --chat-model none
    python benchmarks/bench_server.py --models --gemma2-layers 2 --section chat     # the chat case only
    python benchmarks/bench_server.py --smoke --no-record           # tiny fixtures, under a minute
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai

from mlx_gemma.convert.writer import write_model_folder

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
import models  # noqa: E402
from bench_generate import FILLER, model_folder  # noqa: E402

ROOT = Path(__file__).parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
BANNED = {1: -100, 106: -100}  # <eos>, <end_of_turn>: the same ids in every Gemma 1-3 tokenizer here
PROMPT_WORDS = [24, 200, 48, 400, 96, 32, 300, 150]  # one request each, in this order
LIBRARIES = ("mlx_gemma", "mlx-lm")
# Gemma 1-3's turn format (Google's published chat templates: <start_of_turn>{role}\n{text}<end_of_turn>\n,
# the assistant named "model"), for mlx-lm; a system message is not used here.
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


# ----- the server processes ---------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(library: str, folder: Path, port: int, max_batch: int) -> list[str]:
    common_flags = ["--model", str(folder), "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"]
    if library == "mlx_gemma":
        return [sys.executable, "-m", "mlx_gemma.server", *common_flags, "--max-batch", str(max_batch)]
    return [sys.executable, "-m", "mlx_lm.server", *common_flags, "--chat-template", GEMMA_TEMPLATE,
            "--decode-concurrency", str(max_batch)]


def autogroup_nice(path: Path = Path("/proc/self/autogroup")) -> str | None:
    """This process's autogroup nice ("/autogroup-N nice K" -> "K"), or None where there is none: not Linux,
    autogroup off, or a sandbox whose /proc/self/autogroup exists but reads empty (CI's does)."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    return fields[-1] if len(fields) == 3 and fields[1] == "nice" else None


def inherit_autogroup(pid: int) -> None:
    """Give the session of `pid` (a server, started in a session of its own) this process's autogroup nice:
    Linux's autogroup scheduling shares the CPU between sessions, so `echo -20 > /proc/<bench>/autogroup`
    would not reach the server, which does the work.  Nothing to do where there is no autogroup."""
    nice = autogroup_nice()
    if nice is None:
        return
    try:
        Path(f"/proc/{pid}/autogroup").write_text(nice)
    except OSError:
        pass


class Server:
    """One server in a process group of its own: `with Server(...) as s:` is up; leaving it kills the group."""

    def __init__(self, library: str, folder: Path, max_batch: int = 8, timeout: float = 600.0):
        self.library, self.folder, self.max_batch, self.timeout = library, folder, max_batch, timeout
        # The names clients give: ours serves a folder under the name given to --model; mlx-lm's default.
        self.model = str(folder) if library == "mlx_gemma" else "default_model"
        self.proc = None

    def __enter__(self) -> Server:
        port = free_port()
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(port), cwd=str(ROOT),
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        inherit_autogroup(self.proc.pid)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    self.fail(f"exited with {self.proc.returncode}")
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            self.fail("did not answer /health in time")
        except BaseException:  # a SIGTERM (SystemExit) or ^C while it starts: __exit__ will not run
            self.stop()
            self.log.close()
            raise

    def command(self, port: int) -> list[str]:
        """The server's command line (bench_distributed_server.py launches ours on 2 ranks instead)."""
        return server_command(self.library, self.folder, port, self.max_batch)

    def fail(self, why: str):
        self.stop()
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace")[-3000:]
        raise RuntimeError(f"{self.library} server on {self.folder.name} {why}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after 15 s: no orphan server is left behind."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=3600)


# ----- one streamed request ---------------------------------------------------------------------


@dataclass
class Reply:
    """What one streamed chat completion gave: timings (s) and the usage it reported."""

    text: str
    ttft: float
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


async def stream_chat(client: openai.AsyncOpenAI, model: str, messages: list[dict], max_tokens: int) -> Reply:
    tic = time.perf_counter()
    first, parts, usage = None, [], None
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                  temperature=0.0, logit_bias=BANNED, stream=True,
                                                  stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                parts.append(choice.delta.content)
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the server sent no usage chunk (stream_options.include_usage)")
    details = usage.prompt_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    return Reply("".join(parts), (first or end) - tic, end - tic, usage.prompt_tokens, usage.completion_tokens,
                 cached)


# ----- the throughput case ----------------------------------------------------------------------


def requests_for(tag: str, max_tokens: int, words: list[int]) -> list[tuple[list[dict], int]]:
    """(messages, max_tokens) per request: filler prompts of `words` words, max_tokens and half of it."""
    text = (FILLER * (max(words) // 20 + 2)).split()
    out = []
    for i, n in enumerate(words):
        content = f"[{tag} {i}] " + " ".join(text[i * 5:i * 5 + n]) + "\nContinue the story."
        out.append(([{"role": "user", "content": content}], max_tokens if i % 2 == 0 else max(1, max_tokens // 2)))
    return out


async def run_clients(server: Server, requests, clients: int) -> tuple[float, list[Reply]]:
    """`clients` workers taking `requests` from one queue; (wall seconds, replies in request order)."""
    client = server.client()
    queue: asyncio.Queue = asyncio.Queue()
    for i, r in enumerate(requests):
        queue.put_nowait((i, r))
    replies: list[Reply | None] = [None] * len(requests)

    async def worker():
        while not queue.empty():
            i, (messages, max_tokens) = queue.get_nowait()
            replies[i] = await stream_chat(client, server.model, messages, max_tokens)

    tic = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(clients)))
    finally:
        await client.close()
    return time.perf_counter() - tic, replies


def throughput_run(server: Server, tag: str, clients: int, max_tokens: int, words: list[int]) -> dict:
    requests = requests_for(tag, max_tokens, words)
    seconds, replies = asyncio.run(run_clients(server, requests, clients))
    made = sum(r.completion_tokens for r in replies)
    asked = sum(m for _, m in requests)
    if made != asked:
        print(f"note: {server.library} made {made} tokens where {asked} were asked", file=sys.stderr)
    return {"tokens_per_s": made / seconds, "ttfts": [r.ttft for r in replies],
            "prompt_tokens": sum(r.prompt_tokens for r in replies), "tokens": made}


# ----- the chat case ----------------------------------------------------------------------------


def chat_turns(tag: str, turns: int, words: int) -> list[str]:
    """The user's messages: `words` words of filler each, a different stretch per turn."""
    text = (FILLER * (words * turns // 20 + 2)).split()
    return [f"[{tag}] Part {k + 1}: " + " ".join(text[k * words:(k + 1) * words]) for k in range(turns)]


async def chat(server: Server, users: list[str], max_tokens: int) -> list[Reply]:
    """A conversation of len(users) turns, each reply appended as streamed before the next turn."""
    client = server.client()
    messages, replies = [], []
    try:
        for user in users:
            messages.append({"role": "user", "content": user})
            reply = await stream_chat(client, server.model, messages, max_tokens)
            messages.append({"role": "assistant", "content": reply.text})
            replies.append(reply)
    finally:
        await client.close()
    return replies


def gemma2_chat_folder(bits: int | None, layers: int | None, window: int) -> Path:
    """The Gemma 2 2B-shaped random model of benchmarks/models.py with a sliding window of `window`."""
    config = {**models.GEMMA2_2B, "num_hidden_layers": layers or models.GEMMA2_2B["num_hidden_layers"],
              "sliding_window": window}
    name = f"gemma-2-2b-random-{config['num_hidden_layers']}l-window{window}"
    dest = models.bench_dir() / f"{name}-bf16"
    if not (dest / "config.json").is_file():
        write_model_folder(dest, config, models._random_weights(config), FIXTURES / "gemma3_270m" / "tokenizer.model",
                           {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0})
    return models._quantized(dest, name, bits)


# ----- the plan: which server runs what, alternating ----------------------------------------------


@dataclass
class Plan:
    throughput: list[tuple[str, Path]]  # (case name, folder)
    chat: tuple[str, Path] | None
    clients: list[int]
    words: list[int]
    chat_turns: int
    chat_words: int
    max_tokens: int
    reps: int


def one_server(library: str, name: str, folder: Path, plan: Plan, rep: int, runs: dict, do_chat: bool) -> None:
    """Start `library` on `folder`, warm it up, run this rep's cases into `runs`, stop it."""
    with Server(library, folder, max_batch=max(plan.clients)) as server:
        # The chat warms up one request at a time: mlx-lm 0.32's server loses its generation thread
        # ("generation thread died") on two concurrent requests to the Gemma 2-shaped folder.
        asyncio.run(run_clients(server, requests_for(f"warm-up {rep}", 2, plan.words[:2]), 1 if do_chat else 2))
        if not do_chat:
            for clients in plan.clients:
                tag = f"rep {rep} clients {clients}"  # the same prompts for both servers
                result = throughput_run(server, tag, clients, plan.max_tokens, plan.words)
                runs.setdefault((name, clients, library), []).append(result)
                print(f"{name} clients {clients} {library}: {result['tokens_per_s']:.2f} tok/s", flush=True)
        else:
            users = chat_turns(f"rep {rep}", plan.chat_turns, plan.chat_words)
            replies = asyncio.run(chat(server, users, plan.max_tokens))
            runs.setdefault((name, "chat", library), []).append(replies)
            print(f"{name} chat {library}: processed per turn "
                  f"{[r.prompt_tokens - r.cached_tokens for r in replies]}", flush=True)


def run_plan(plan: Plan) -> dict:
    """Every (case, library) over plan.reps repetitions, the two libraries alternating on each folder."""
    runs: dict = {}
    jobs = [(name, folder, False) for name, folder in plan.throughput]
    if plan.chat is not None:
        jobs.append((*plan.chat, True))
    for name, folder, do_chat in jobs:
        for rep in range(plan.reps):
            for library in LIBRARIES:
                one_server(library, name, folder, plan, rep, runs, do_chat)
    return runs


# ----- the report -------------------------------------------------------------------------------


def throughput_table(plan: Plan, runs: dict, payload: dict) -> str:
    rows = [["model", "clients", "server", "tokens/s", "TTFT median s", "TTFT p95 s", "prompt tokens"]]
    for name, _ in plan.throughput:
        for clients in plan.clients:
            speeds = {}
            for library in LIBRARIES:
                results = runs[(name, clients, library)]
                series = common.Series([common.Run({"tps": r["tokens_per_s"]}) for r in results])
                ttfts = [t for r in results for t in r["ttfts"]]  # every request of every repetition
                speeds[library] = series.median("tps")
                p50, p95 = np.percentile(ttfts, 50), np.percentile(ttfts, 95)
                rows.append([name, str(clients), library, f"{speeds[library]:.2f} ±{series.spread('tps'):.0%}",
                             f"{p50:.3f}", f"{p95:.3f}", str(results[0]["prompt_tokens"])])
                payload["throughput"].append({"model": name, "clients": clients, "server": library,
                                              "tokens_per_s": speeds[library], "ttft_median_s": p50,
                                              "ttft_p95_s": p95, "prompt_tokens": results[0]["prompt_tokens"]})
            ratio = common.ratio(speeds["mlx_gemma"], speeds["mlx-lm"])
            rows.append([name, str(clients), "**ours / mlx-lm**", f"**{ratio:.2f}x**", "", "", ""])
    return common.table(rows)


def chat_table(plan: Plan, runs: dict, payload: dict) -> str:
    name = plan.chat[0]
    rows = [["turn", "server", "prompt tokens", "cached", "processed", "new since last reply", "TTFT median s"]]
    for library in LIBRARIES:
        reps = runs[(name, "chat", library)]
        for k in range(plan.chat_turns):
            turn = [rep[k] for rep in reps]
            r = turn[0]  # token counts are the same in every repetition (greedy, same lengths)
            new = r.prompt_tokens - (reps[0][k - 1].prompt_tokens + reps[0][k - 1].completion_tokens if k else 0)
            ttft = float(np.median([t.ttft for t in turn]))
            rows.append([str(k + 1), library, str(r.prompt_tokens), str(r.cached_tokens),
                         str(r.prompt_tokens - r.cached_tokens), str(new), f"{ttft:.3f}"])
            payload["chat"].append({"turn": k + 1, "server": library, "prompt_tokens": r.prompt_tokens,
                                    "cached_tokens": r.cached_tokens, "processed": r.prompt_tokens - r.cached_tokens,
                                    "new_tokens": new, "ttft_median_s": ttft})
    return common.table(rows)


def report(plan: Plan, runs: dict) -> tuple[str, dict]:
    payload: dict = {"throughput": [], "chat": []}
    folders = [f"{name} = `{folder.name}`" for name, folder in plan.throughput + ([plan.chat] if plan.chat else [])]
    lengths = ", ".join(map(str, plan.words))
    body = (f"Loopback, one server at a time, {plan.reps} alternating repetitions after a warm-up request; the "
            f"`openai` async client, streaming, greedy, EOS banned by logit_bias. Throughput: {len(plan.words)} "
            f"requests of {lengths} filler words + a tag, max_tokens {plan.max_tokens} and {plan.max_tokens // 2} "
            "alternating, taken from one queue by each number of clients; tokens/s is all completion tokens over "
            "the wall time of the set (± half the range over the median); TTFT percentiles over every request. "
            f"Model folders: {', '.join(folders)}.\n\n")
    if plan.throughput:
        body += throughput_table(plan, runs, payload) + "\n"
    if plan.chat is not None:
        body += (f"\n{plan.chat_turns}-turn chat on {plan.chat[0]} ({plan.chat_words} words a turn, replies of "
                 f"{plan.max_tokens} tokens): processed = usage.prompt_tokens - "
                 "usage.prompt_tokens_details.cached_tokens, as each server reports them; new = this prompt's "
                 "tokens past the previous prompt and reply.\n\n" + chat_table(plan, runs, payload) + "\n")
    return body, payload


# ----- the command ------------------------------------------------------------------------------


def plan_from(args) -> Plan:
    if args.smoke:  # the tiny fixtures: checks the machinery, measures nothing of interest
        chat = None if args.chat_model == "none" else ("tiny_gemma2", FIXTURES / "tiny_gemma2")
        return Plan([("tiny_gemma3", FIXTURES / "tiny_gemma3")], chat, args.clients, [4, 12, 8, 20, 6, 16, 10, 14],
                    args.chat_turns, 2, args.max_tokens or 8, args.reps or 1)
    throughput = [(name, model_folder(name, args.gemma2_layers)) for name in args.models]
    chat = None
    if args.chat_model != "none":
        bits = None if args.chat_model.endswith("bf16") else 4
        chat = (f"{args.chat_model} window {args.chat_window}",
                gemma2_chat_folder(bits, args.gemma2_layers, args.chat_window))
    return Plan(throughput, chat, args.clients, PROMPT_WORDS, args.chat_turns, args.chat_words,
                args.max_tokens or 64, args.reps or 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cases = ["270m-bf16", "270m-4bit", "2b-bf16", "2b-4bit"]
    p.add_argument("--models", nargs="*", default=["270m-bf16", "270m-4bit"], choices=cases,
                   help="folders for the throughput case (as bench_generate.py makes them; none: the chat only)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8], help="concurrent streaming clients")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 3; 1 with --smoke)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request (default 64; 8 with --smoke)")
    p.add_argument("--chat-model", default="2b-bf16", choices=["2b-bf16", "2b-4bit", "none"],
                   help="the Gemma 2-shaped folder of the chat case ('none' skips it)")
    p.add_argument("--chat-window", type=int, default=512, help="its sliding window, shorter than the chat")
    p.add_argument("--chat-turns", type=int, default=4)
    p.add_argument("--chat-words", type=int, default=300, help="filler words in each user turn")
    p.add_argument("--gemma2-layers", type=int, default=None, help="cut the 2B-shaped models to this many layers")
    p.add_argument("--smoke", action="store_true", help="tiny fixtures (tiny_gemma3, tiny_gemma2; --models and --chat-* sizes ignored), one repetition: checks that it runs, never recorded")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--section", default=None, help="record under a section of this name in RESULTS.md")
    args = p.parse_args(argv)
    if min(args.clients) < 1:
        p.error("--clients must be at least 1")
    # A SIGTERM to this script unwinds through the `with Server` blocks, so their groups are killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = plan_from(args)
    body, payload = report(plan, run_plan(plan))
    if args.smoke and not args.no_record:
        print("--smoke figures are not recorded", file=sys.stderr)
        args.no_record = True
    return common.finish("bench_server", argv, args.no_record, body, payload, args.section)


if __name__ == "__main__":
    sys.exit(main())
