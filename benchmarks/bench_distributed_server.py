"""The server across ranks on one machine: 2 ranks against 1 process, and what `InOrder` costs (issue 23).

**Servers.** `python -m mlx_gemma.server` on the folder, then `mlx.launch -n 2 --backend ring python -m
mlx_gemma.server --pipeline` and `--tensor-parallel` on the same folder, one at a time, alternating over the
repetitions (1 process, pipeline, tensor, 1 process, ...).  Each is started, warmed up and driven as
bench_server.py drives a server (its `Server`, requests and clients: the official `openai` async client,
streaming, greedy, EOS banned so every request makes its max_tokens, prompts tagged per repetition so no
prefix cache reuses an earlier run's): aggregate tokens/s and time to first token for 1 and 4 concurrent
clients.  On one machine both ranks share the same cores, so the ratio 2 ranks / 1 process is the
overhead of serving across ranks (hand-offs, shared logits, rank 0's messages, two processes'
scheduling), never a speed-up (docs/distributed.md).

**InOrder.** Each rank's scheduler computes every forward pass as soon as the policy makes it
(distributed/serving.py's `InOrder`), so collectives run in one order on every rank; a single process
pipelines its steps instead (step n + 1 queued while step n computes).  A 1-rank group cannot show the
difference through the server, so this process runs a `batching.Scheduler` on the model plain and with
the model wrapped in `InOrder`, as `RankScheduler` wraps it, alternating, on the same requests (chat
template, the same lengths) taken by 1 and 4 client threads.

    python benchmarks/bench_distributed_server.py                  # the packaged Gemma 3 270M (27 min on
                                                                   # the 2-core machine at load 20-25)
    python benchmarks/bench_distributed_server.py --only inorder --reps 5
    python benchmarks/bench_distributed_server.py --smoke --no-record  # tiny_gemma3: checks it runs
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import shutil
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import mlx_gemma
from mlx_gemma.batching import Scheduler
from mlx_gemma.distributed.serving import InOrder
from mlx_gemma.jobs import Job
from mlx_gemma.samplers import SamplingSettings
from mlx_gemma.server.cli import build_parser
from mlx_gemma.server.speculation import ServerSpeculation

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402
from bench_generate import model_folder  # noqa: E402
from bench_server import BANNED, FIXTURES, Server, requests_for, run_clients, throughput_run  # noqa: E402

WORDS = [8, 32, 16, 48]  # filler words of each request's prompt (bench_server's requests, fewer and shorter)
SERVERS = {"1 process": None, "2 ranks, pipeline": "--pipeline", "2 ranks, tensor": "--tensor-parallel"}
VARIANTS = ("plain", "InOrder")
MLX_LAUNCH = shutil.which("mlx.launch", path=os.path.dirname(sys.executable)) or "mlx.launch"


# ----- the server on 2 ranks -------------------------------------------------------------------


def ring_port(ranks: int = 2, tries: int = 200) -> int:
    """A port P such that P .. P + ranks - 1 are all free on loopback (the ring backend listens on
    --starting-port + rank); random, so that runs beside this one (tests) rarely pick the same."""
    for _ in range(tries):
        base = random.randrange(20_000, 60_000 - ranks)
        try:
            for p in range(base, base + ranks):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {ranks} consecutive free loopback ports found")


def launch_command(folder: Path, flag: str, port: int, ring: int, max_batch: int) -> list[str]:
    """mlx.launch's command line for the server on 2 ranks.  The server's flags come after `--`:
    mlx.launch parses known flags anywhere and abbreviations too (the server's --host would be its --hosts)."""
    return [MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", str(ring), "--",
            sys.executable, "-m", "mlx_gemma.server", "--model", str(folder), "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "WARNING", "--max-batch", str(max_batch), flag]


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running (zombies waiting to be reaped do not count)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


class RankServer(Server):
    """Ours on 2 ranks: the process group holds mlx.launch and both ranks.  SIGTERM reaches all three;
    rank 0 closes and its close ends the follower; stop also waits for the ranks to be gone, so the
    next server does not start beside them."""

    def __init__(self, folder: Path, flag: str, max_batch: int, timeout: float = 600.0):
        super().__init__("mlx_gemma", folder, max_batch, timeout)
        self.flag = flag
        self.library = f"mlx_gemma {flag}"  # (named in a failure's message)

    def command(self, port: int) -> list[str]:
        return launch_command(self.folder, self.flag, port, ring_port(), self.max_batch)

    def stop(self) -> None:
        pgid = self.proc.pid if self.proc is not None else None
        super().stop()
        if pgid is None:
            return
        deadline = time.monotonic() + 30
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def server_for(name: str, folder: Path, max_batch: int) -> Server:
    flag = SERVERS[name]
    return Server("mlx_gemma", folder, max_batch) if flag is None else RankServer(folder, flag, max_batch)


def serve_rep(name: str, folder: Path, clients: list[int], words: list[int], max_tokens: int, rep: int,
              runs: dict) -> None:
    """One repetition on one server: start it, warm it up, each number of clients, stop it."""
    with server_for(name, folder, max(clients)) as server:
        asyncio.run(run_clients(server, requests_for(f"warm-up {rep}", 2, words[:2]), 2))
        for n in clients:
            load = os.getloadavg()[0]
            result = throughput_run(server, f"rep {rep} clients {n}", n, max_tokens, words)
            result["load"] = load
            runs.setdefault((name, n), []).append(result)
            print(f"{name}, {n} clients: {result['tokens_per_s']:.2f} tok/s (load {load:.1f})", flush=True)


# ----- InOrder against the plain scheduler, in this process -------------------------------------


def make_scheduler(model, tokenizer, folder: Path, variant: str, max_batch: int) -> Scheduler:
    """The single-process server's Scheduler on `model` (its batch policy as server/cli.py picks it for
    `--model folder`: speculation's policy, which speculates only when a job asks); "InOrder": its policy
    sees the model wrapped as RankScheduler wraps it (distributed/serving.py), every forward pass and head
    call computed as soon as it is made."""
    args = build_parser().parse_args(["--model", str(folder), "--max-batch", str(max_batch)])
    scheduler = Scheduler(model, max_batch=max_batch, policy=ServerSpeculation(args).policy(tokenizer))
    if variant == "InOrder":
        scheduler._policy.model = InOrder(model)  # what RankScheduler.__init__ does on every rank
    return scheduler


def scheduler_jobs(tokenizer, tag: str, max_tokens: int, words: list[int]) -> list[Job]:
    """bench_server's requests as the server would queue them: the chat template's ids, greedy, EOS banned."""
    stops = frozenset(tokenizer.eos_token_ids)
    return [Job(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True), limit,
                SamplingSettings(temp=0.0, logit_bias=BANNED), stop_ids=stops)
            for messages, limit in requests_for(tag, max_tokens, words)]


def scheduler_run(scheduler: Scheduler, jobs: list[Job], clients: int) -> dict:
    """`clients` threads taking `jobs` from one queue, each submitting one and waiting for its last event
    (as bench_server's clients wait for a stream's end): tokens/s over the wall time, TTFT per job (from
    submit to its first token), and the tokens each job got."""
    todo: queue.Queue = queue.Queue()
    for item in enumerate(jobs):
        todo.put(item)
    ttfts, tokens, errors = [0.0] * len(jobs), [[] for _ in jobs], []

    def client() -> None:
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            done, first = threading.Event(), []

            def on_event(event, i=i) -> None:  # on the MLX thread: record and return
                if event.token is not None:
                    if not first:
                        first.append(time.perf_counter())
                    tokens[i].append(event.token)
                if event.finish_reason is not None:
                    if event.finish_reason in ("error", "cancelled"):
                        errors.append(f"job {i}: {event.finish_reason} {event.error or ''}")
                    done.set()

            tic = time.perf_counter()
            scheduler.submit(job, on_event)
            done.wait()
            ttfts[i] = (first[0] if first else time.perf_counter()) - tic

    threads = [threading.Thread(target=client) for _ in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - tic
    if errors:
        raise RuntimeError("; ".join(errors))
    made = sum(map(len, tokens))
    return {"tokens_per_s": made / seconds, "ttfts": ttfts, "tokens": made, "ids": tokens, "seconds": seconds}


def inorder_rep(model, tokenizer, folder: Path, variant: str, clients: list[int], words: list[int], max_tokens: int,
                rep: int, runs: dict) -> None:
    scheduler = make_scheduler(model, tokenizer, folder, variant, max(clients))
    scheduler.start()
    try:
        scheduler_run(scheduler, scheduler_jobs(tokenizer, f"warm-up {rep}", 2, words[:2]), 2)
        for n in clients:
            load = os.getloadavg()[0]
            result = scheduler_run(scheduler, scheduler_jobs(tokenizer, f"rep {rep} clients {n}", max_tokens, words),
                                   n)
            result["load"] = load
            runs.setdefault((variant, n), []).append(result)
            print(f"scheduler {variant}, {n} clients: {result['tokens_per_s']:.2f} tok/s (load {load:.1f})",
                  flush=True)
    finally:
        scheduler.close()


# ----- the report ------------------------------------------------------------------------------


def summarize(results: list[dict]) -> dict:
    """Medians over repetitions: tokens/s (and its spread), TTFT median and p95 over every request."""
    series = common.Series([common.Run({"tps": r["tokens_per_s"]}) for r in results])
    ttfts = [t for r in results for t in r["ttfts"]]
    return {"tokens_per_s": series.median("tps"), "spread": series.spread("tps"),
            "runs": [r["tokens_per_s"] for r in results],
            "ttft_median_s": float(np.percentile(ttfts, 50)), "ttft_p95_s": float(np.percentile(ttfts, 95))}


def comparison(runs: dict, names, clients: list[int], base: str, payload: list) -> str:
    """A table of every (name, clients) against `base` at the same number of clients."""
    rows = [["clients", "run", "tokens/s (median)", "per repetition", "TTFT median s", "TTFT p95 s",
             f"tokens/s / {base}", f"per repetition / {base}", f"TTFT median / {base}"]]
    for n in clients:
        ref = summarize(runs[(base, n)])
        for name in names:
            s = summarize(runs[(name, n)])
            rate = common.ratio(s["tokens_per_s"], ref["tokens_per_s"])
            paired = [common.ratio(x, y) for x, y in zip(s["runs"], ref["runs"])]  # each against its neighbour
            ttft = common.ratio(s["ttft_median_s"], ref["ttft_median_s"])
            rows.append([str(n), name, f"{s['tokens_per_s']:.2f} ±{s['spread']:.0%}",
                         ", ".join(f"{x:.2f}" for x in s["runs"]), f"{s['ttft_median_s']:.2f}",
                         f"{s['ttft_p95_s']:.2f}", "" if name == base else f"**{rate:.2f}x**",
                         "" if name == base else ", ".join(f"{x:.2f}" for x in paired),
                         "" if name == base else f"{ttft:.2f}x"])
            payload.append({"clients": n, "run": name, **s, "ratio_tokens_per_s": rate, "ratios_paired": paired,
                            "ratio_ttft_median": ttft})
    return common.table(rows)


def loads(runs: dict) -> str:
    values = [r["load"] for results in runs.values() for r in results]
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}" if values else "-"


def report(folder: Path, args, servers: dict, inorder: dict) -> tuple[str, dict]:
    payload: dict = {"servers": [], "inorder": []}
    requests = (f"{len(args.words)} requests of {', '.join(map(str, args.words))} filler words + a tag, max_tokens "
                f"{args.max_tokens} and {args.max_tokens // 2} alternating, taken from one queue by each number of "
                "clients; tokens/s = all completion tokens over the set's wall time (± half the range over the "
                "median); TTFT percentiles over every request of every repetition")
    body = f"Folder `{folder.name}`; {args.reps} alternating repetitions, each after a warm-up; {requests}.\n"
    if servers:
        body += (f"\nServers on loopback, one at a time (1 process, pipeline, tensor, ...), each driven by the "
                 f"`openai` async client, streaming, greedy, EOS banned by logit_bias; 1-minute load average at "
                 f"the sets (min / median / max): {loads(servers)}.\n\n"
                 + comparison(servers, list(SERVERS), args.clients, "1 process", payload["servers"]) + "\n")
    if inorder:
        body += ("\nInOrder's cost in one process: the single-process server's `batching.Scheduler` and batch "
                 "policy (server/speculation.py's, no speculation asked) plain against the model wrapped in "
                 "`InOrder` (as every rank's scheduler wraps it), alternating, the same requests through the chat "
                 f"template from client threads; TTFT from submit to the first token; load (min / median / max): "
                 f"{loads(inorder)}.\n\n"
                 + comparison(inorder, list(VARIANTS), args.clients, "plain", payload["inorder"]) + "\n")
    return body, payload


# ----- the command -----------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: the packaged Gemma 3 270M, bf16)")
    p.add_argument("--clients", nargs="+", type=int, default=[1, 4], help="concurrent streaming clients")
    p.add_argument("--words", nargs="+", type=int, default=None, help=f"prompt lengths in words (default {WORDS})")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per request, and half (default 16)")
    p.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 3; 1 with --smoke)")
    p.add_argument("--only", choices=["servers", "inorder"], default=None, help="run one of the two cases (recorded in a section of its own)")
    p.add_argument("--smoke", action="store_true", help="tests/fixtures/tiny_gemma3, 1 repetition, never recorded")
    p.add_argument("--no-record", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args(argv)
    if min(args.clients) < 1:
        p.error("--clients must be at least 1")
    args.words = args.words or ([4, 12, 8, 20] if args.smoke else WORDS)
    args.max_tokens = args.max_tokens or (8 if args.smoke else 16)
    args.reps = args.reps or (1 if args.smoke else 3)
    folder = Path(args.model) if args.model else (FIXTURES / "tiny_gemma3" if args.smoke else model_folder("270m-bf16", None))
    # A SIGTERM to this script unwinds through the `with Server` blocks, so their groups are killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    servers: dict = {}
    inorder: dict = {}
    if args.only != "inorder":
        for rep in range(args.reps):
            for name in SERVERS:
                serve_rep(name, folder, args.clients, args.words, args.max_tokens, rep, servers)
    if args.only != "servers":
        model, tokenizer = mlx_gemma.load(folder)
        for rep in range(args.reps):
            for variant in VARIANTS:
                inorder_rep(model, tokenizer, folder, variant, args.clients, args.words, args.max_tokens, rep, inorder)
    body, payload = report(folder, args, servers, inorder)
    if args.smoke and not args.no_record:
        print("--smoke figures are not recorded", file=sys.stderr)
        args.no_record = True
    return common.finish("bench_distributed_server", argv, args.no_record, body, payload, args.only)


if __name__ == "__main__":
    sys.exit(main())
