"""What every benchmark shares: alternating A/B runs, statistics, the bandwidth ceiling, reports.

Each benchmark times mlx_gemma and mlx-lm in one process, alternating
A B A B over the repetitions so that a noisy machine (other work, thermal
throttling) hurts both alike, and reports medians, spreads and the ratio
ours / mlx-lm.  Results go to stdout as a table plus one JSON line, and are
written into `benchmarks/RESULTS.md` between markers named after the script
and the device kind (CPU, GPU), so the file is regenerated, never hand-edited.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import mlx.core as mx

RESULTS = Path(__file__).with_name("RESULTS.md")


@dataclass
class Run:
    """One timed run: a figure per metric (tokens/s, seconds, GB)."""

    metrics: dict[str, float]


@dataclass
class Series:
    """Every run of one library on one case."""

    runs: list[Run] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r.metrics[key] for r in self.runs)

    def spread(self, key: str) -> float:
        """Half the range, relative to the median (0.05 = +-5%)."""
        values = [r.metrics[key] for r in self.runs]
        mid = statistics.median(values)
        return (max(values) - min(values)) / 2 / mid if mid else 0.0


def alternate(runners: dict[str, Callable[[], Run]], reps: int, warmup: int = 1) -> dict[str, Series]:
    """Run each runner `warmup` times untimed, then `reps` times, interleaved A B A B."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    out = {name: Series() for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            out[name].runs.append(run())
    return out


def memory_run(fn: Callable[[], dict[str, float]]) -> Run:
    """Run `fn` and add its peak memory (GB) above what was allocated before it started.

    Both libraries' models live in the process at once, so the absolute peak would
    count the other's weights; the increment plus the model's own weight bytes is
    what this library alone would need.
    """
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    metrics = fn()
    mx.synchronize()
    metrics["peak_extra_gb"] = (mx.get_peak_memory() - before) / 1e9
    return Run(metrics)


def weight_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def bandwidth_ceiling(gib: float = 1.0, reps: int = 5) -> float:
    """Memory bandwidth in GB/s: the best of `reps` timed `a + 1` over `gib` GiB (read + write).

    On the CPU, MLX runs one elementwise op on one thread: the array is cut into
    one slice per core, each added on a stream (thread) of its own, so the
    ceiling is the machine's and not one core's.
    """
    from mlx_gemma.cpu_spread import cpu_threads

    n = int(gib * (1 << 30)) // 4
    a = mx.zeros((n,), mx.float32)
    mx.eval(a)
    parts = cpu_threads() if mx.default_device() == mx.cpu else 1
    streams = [mx.new_stream(mx.default_device()) for _ in range(parts)]
    bounds = [n * i // parts for i in range(parts + 1)]
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        outs = []
        for s, lo, hi in zip(streams, bounds, bounds[1:]):
            with mx.stream(s):
                outs.append(a[lo:hi] + 1)
        mx.eval(outs)
        best = min(best, time.perf_counter() - tic)
        del outs
    del a
    mx.clear_cache()
    return 2 * n * 4 / best / 1e9


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("mlx", "mlx-lm", "mlx_gemma", "llama_cpp_python"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def machine() -> str:
    device = mx.default_device()
    cpu = platform.processor() or platform.machine()
    try:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), cpu)
    except OSError:
        model = cpu
    try:
        import os

        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        import os

        cores = os.cpu_count()
    extra = ""
    if device.type == mx.gpu:
        try:
            extra = " | " + mx.device_info().get("device_name", "GPU")
        except Exception:  # noqa: BLE001 - informational only
            extra = " | GPU"
    return f"{platform.system()} {platform.machine()}, {model}, {cores} cores, MLX device {device}{extra}"


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else float("nan")


def table(rows: list[list[str]]) -> str:
    """A Markdown table from rows (the first is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows[1:]])


def finish(script: str, argv, no_record: bool, body: str, payload: dict, section: str | None = None) -> int:
    """Print the report, or record it in RESULTS.md with the command that made it.

    `section` names a section of its own (several configurations of one script
    side by side); by default one section per script and device kind.
    """
    if no_record:
        print(body)
        return 0
    args = " ".join(argv if argv is not None else sys.argv[1:])
    record(script, f"python benchmarks/{script}.py {args}".strip(), body, payload, section)
    return 0


def record(script: str, command: str, body: str, payload: dict, section: str | None = None) -> None:
    """Print the report and write it into RESULTS.md between this script's (and section's) markers."""
    head = (f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}  \n"
            f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}  \n"
            f"Command: `{command}`  \n{_commit()}\n")
    device = mx.default_device().type.name
    key = f"{script}-{device}" + (f"-{section}" if section else "")
    title = f"{script} ({device.upper()}{', ' + section if section else ''})"
    block = f"<!-- {key}:begin -->\n## {title}\n\n{head}\n{body}\n<!-- {key}:end -->"
    print(body)
    print(json.dumps({"benchmark": script, **payload}))
    text = RESULTS.read_text() if RESULTS.exists() else (
        "# Benchmark results\n\nWritten by the scripts in this folder (`python benchmarks/<script>.py`); "
        "each run replaces its own section. Do not edit by hand.\n")
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"Commit: {sha}  " if sha else ""
