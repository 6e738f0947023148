"""benchmarks/bench_distributed.py end to end on tiny_gemma3 (about 5 s): the one check that its launch,
its worker and its report still work (a change to the pipeline stage once broke it unnoticed; it reads
Stage.message_width), and that the bytes it reports per token are the messages' sizes, computed here
from the model's config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES

BENCH = Path(__file__).parent.parent / "benchmarks" / "bench_distributed.py"
FOLDER = FIXTURES / "tiny_gemma3"


def test_the_benchmark_reports_rates_bytes_and_the_meeting():
    done = subprocess.run([sys.executable, str(BENCH), "--model", str(FOLDER), "--rounds", "1", "--max-tokens", "4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    config = json.loads((FOLDER / "config.json").read_text())
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[config["dtype"]]
    # rank 0 of 2 sends its hidden state [1, 1, hidden] and half of the logits' ring all_sum (2(n-1)/n of them)
    want = config["hidden_size"] * itemsize + config["vocab_size"] * itemsize * 2 * (2 - 1) // 2
    assert f"bytes sent per token by rank 0: {want:,} " in out, out
    rates = [float(x) for x in re.findall(r"^\S+ \S+\s*:\s+([\d.]+) tok/s", out, re.M)]
    assert len(rates) == 2 and all(r > 0 for r in rates), out
    ratio = float(re.search(r"2 ranks / 1 process: ([\d.]+)x", out).group(1))
    assert abs(ratio - rates[1] / rates[0]) <= 0.01, out
    meeting = re.search(r"failure meeting, alone: (\d+) us a step", out)
    assert meeting and int(meeting.group(1)) > 0, out
