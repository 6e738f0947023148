"""benchmarks/bench_distributed_server.py's helpers: mlx.launch's command line, the ring's ports, the process
group's teardown and autogroup, the in-process clients that measure InOrder, and the report's medians.

One test launches the server on 2 ranks of tiny_gemma3 (9.5 s here at load ~10): it is the only check
that the benchmark's launch works and that stopping it leaves no rank running into the next server's run.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES

import mlx_gemma
from mlx_gemma.generate import stream_generate
from mlx_gemma.samplers import SamplingSettings
from mlx_gemma.server.cli import build_parser

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

import bench_distributed_server as bench  # noqa: E402
import bench_server  # noqa: E402
from bench_server import BANNED, throughput_run  # noqa: E402

FOLDER = FIXTURES / "tiny_gemma3"


def test_launch_command_puts_the_server_flags_past_mlx_launch():
    cmd = bench.launch_command(FOLDER, "--tensor-parallel", 8123, 40000, 4)
    cut = cmd.index("--")
    # mlx.launch parses its flags anywhere, abbreviated too (--host would be its --hosts): only before "--"
    assert cmd[:cut] == [bench.MLX_LAUNCH, "-n", "2", "--backend", "ring", "--starting-port", "40000"]
    assert cmd[cut + 1:cut + 4] == [sys.executable, "-m", "mlx_gemma.server"]
    args = build_parser().parse_args(cmd[cut + 4:])
    assert (args.model, args.host, args.port, args.max_batch) == ([str(FOLDER)], "127.0.0.1", 8123, 4)
    assert args.tensor_parallel and not args.pipeline


def test_ring_port_gives_consecutive_free_ports():
    base = bench.ring_port(3)
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_group_alive_sees_running_members_only():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert bench.group_alive(proc.pid)
        proc.kill()
        for _ in range(100):  # a zombie not yet reaped is not running
            if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        assert not bench.group_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert not bench.group_alive(proc.pid)


def test_autogroup_nice_reads_the_nice_or_none(tmp_path):
    for text, want in [("/autogroup-7 nice -20\n", "-20"), ("/autogroup-1 nice 0", "0"), ("", None), ("\n", None),
                       ("garbage", None)]:
        (tmp_path / "autogroup").write_text(text)
        assert bench_server.autogroup_nice(tmp_path / "autogroup") == want
    assert bench_server.autogroup_nice(tmp_path / "missing") is None


@pytest.mark.skipif(bench_server.autogroup_nice() is None,
                    reason="no autogroup scheduling here (not Linux, off, or /proc/self/autogroup reads empty)")
def test_a_server_session_gets_this_process_autogroup_nice():
    proc = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        ours = bench_server.autogroup_nice()
        Path(f"/proc/{proc.pid}/autogroup").write_text("4" if ours == "5" else "5")  # not ours: the copy is seen
        bench_server.inherit_autogroup(proc.pid)
        assert Path(f"/proc/{proc.pid}/autogroup").read_text().split()[-1] == ours
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def tiny():
    return mlx_gemma.load(FOLDER)


@pytest.mark.parametrize("variant", bench.VARIANTS)
def test_scheduler_run_gives_each_job_its_own_tokens(tiny, variant):
    """Every job gets its max_tokens (EOS banned), each the tokens generate gives its prompt alone, with and
    without InOrder; the rates are the tokens over the wall time."""
    model, tok = tiny
    jobs = bench.scheduler_jobs(tok, "test", 6, [4, 12, 8])
    scheduler = bench.make_scheduler(model, tok, FOLDER, variant, 2)
    assert (type(scheduler._policy.model).__name__ == "InOrder") == (variant == "InOrder")
    scheduler.start()
    try:
        result = bench.scheduler_run(scheduler, jobs, 2)
    finally:
        scheduler.close()
    for job, ids in zip(jobs, result["ids"]):
        processors = SamplingSettings(logit_bias=BANNED).processors()
        want = [r.token for r in stream_generate(model, tok, job.prompt_ids, max_tokens=job.max_tokens,
                                                 logits_processors=processors)]
        assert ids == want and len(ids) == job.max_tokens
    assert result["tokens"] == sum(j.max_tokens for j in jobs) == 6 + 3 + 6
    assert result["tokens_per_s"] == pytest.approx(result["tokens"] / result["seconds"])
    assert all(0 < t <= result["seconds"] for t in result["ttfts"])


def test_summaries_and_ratios_are_medians_over_repetitions():
    runs = {("a", 1): [{"tokens_per_s": 2.0, "ttfts": [1.0, 3.0]}, {"tokens_per_s": 4.0, "ttfts": [2.0]},
                       {"tokens_per_s": 3.0, "ttfts": [5.0]}],
            ("b", 1): [{"tokens_per_s": 1.0, "ttfts": [4.0, 2.0]}, {"tokens_per_s": 1.5, "ttfts": [6.0]},
                       {"tokens_per_s": 0.5, "ttfts": [8.0]}]}
    a = bench.summarize(runs[("a", 1)])
    assert a["tokens_per_s"] == statistics.median([2.0, 4.0, 3.0])
    assert a["spread"] == pytest.approx((4.0 - 2.0) / 2 / 3.0)
    assert a["ttft_median_s"] == statistics.median([1.0, 3.0, 2.0, 5.0])
    assert a["ttft_p95_s"] == pytest.approx(np.percentile([1.0, 3.0, 2.0, 5.0], 95))
    payload = []
    text = bench.comparison(runs, ["a", "b"], [1], "a", payload)
    b = payload[1]
    assert b["run"] == "b" and b["ratio_tokens_per_s"] == pytest.approx(1.0 / 3.0)
    assert b["ratios_paired"] == pytest.approx([1.0 / 2.0, 1.5 / 4.0, 0.5 / 3.0])  # repetition by repetition
    assert b["ratio_ttft_median"] == pytest.approx(statistics.median([4.0, 2.0, 6.0, 8.0]) / a["ttft_median_s"])
    assert "**0.33x**" in text


def test_two_ranks_serve_the_benchmark_and_leave_nothing_running():
    with bench.RankServer(FOLDER, "--pipeline", 2) as server:
        pgid = server.proc.pid
        result = throughput_run(server, "test", 2, 4, [4, 12])
    assert result["tokens"] == 4 + 2
    assert not bench.group_alive(pgid)  # mlx.launch and both ranks
