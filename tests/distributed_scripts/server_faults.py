"""One rank of the server across ranks with failures injected on one rank only
(tests/test_distributed_server_errors.py): `mlx.launch ... python server_faults.py DIR SERVER-ARGS...`,
run as server_rank.py runs (pid and exit files in DIR), after wrapping, in this process only, what the
batch policy calls.  A request picks its failure by its max_tokens:

- 13: its row's sampling raises on rank 0 at its 3rd token (a processor or sampler failing there);
- 14: the same on rank 1;
- 15: rank 1's loop raises while reading the step that holds the row's 3rd token (outside collectives);
- 16: rank 1's prefill of its prompt raises (inside a step: the ranks cannot go on).
"""

import runpy
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx

from mlx_gemma import batching

RANK = mx.distributed.init().rank()
SAMPLE_FAILS = {13: 0, 14: 1}  # max_tokens -> the rank whose sampling of it raises
READ_FAILS, PREFILL_FAILS = 15, 16  # on rank 1
sampled, read = Counter(), Counter()
plain_sample_row, plain_read = batching.sample_row, batching.BatchPolicy.read
plain_prefill_chunk = batching.BatchPolicy._prefill_chunk


def sample_row(row, logits, fed):
    sampled[row.id] += 1
    if SAMPLE_FAILS.get(row.job.max_tokens) == RANK and sampled[row.id] == 3:
        raise ValueError(f"injected: sampling fails on rank {RANK}")
    return plain_sample_row(row, logits, fed)


def read_step(self, step, n):
    for out in step.rest:
        if RANK == 1 and out.row.job.max_tokens == READ_FAILS:
            read[out.row.id] += 1
            if read[out.row.id] == 3:
                raise RuntimeError("injected: reading a step fails on rank 1")
    return plain_read(self, step, n)


def prefill_chunk(self, row):
    if RANK == 1 and row.job.max_tokens == PREFILL_FAILS:
        raise RuntimeError("injected: a prompt's forward pass fails on rank 1")
    return plain_prefill_chunk(self, row)


batching.sample_row = sample_row
batching.BatchPolicy.read = read_step
batching.BatchPolicy._prefill_chunk = prefill_chunk
sys.argv = [str(Path(__file__).with_name("server_rank.py")), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
