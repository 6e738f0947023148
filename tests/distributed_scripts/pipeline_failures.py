"""Run under `mlx.launch -n 2 --backend ring`: bad pipeline setups end with clear errors, never a hang.

Usage: pipeline_failures.py CASE ARGS...
- `mismatch A B`: rank 0 loads folder A, rank 1 folder B; every rank must raise DistributedError.
- `too_many FOLDER`: a model with fewer possible stages than ranks; every rank must raise DistributedError.
- `dies FOLDER` / `hangs FOLDER`: rank 1 stops after 3 generated tokens (exits, or sleeps for a
  minute); rank 0, generating under the watchdog (MLX_GEMMA_DISTRIBUTED_TIMEOUT), must end with
  an error line within the timeout.
Each rank prints `rank R: <ErrorType>: <message>` for the error it got.
"""

from __future__ import annotations

import os
import sys
import time

import mlx.core as mx

import mlx_gemma
from mlx_gemma.distributed import watch
from mlx_gemma.errors import DistributedError


def main() -> None:
    case, args = sys.argv[1], sys.argv[2:]
    group = mx.distributed.init()
    rank = group.rank()
    if case in ("mismatch", "too_many"):
        folder = args[rank] if case == "mismatch" else args[0]
        try:
            mlx_gemma.load(folder, group=group, strategy="pipeline")
        except DistributedError as e:
            print(f"rank {rank}: DistributedError: {e}", flush=True)
            return
        raise SystemExit(f"rank {rank}: loaded without an error")
    model, tokenizer = mlx_gemma.load(args[0], group=group, strategy="pipeline")
    with watch("generating"):
        try:
            for n, _ in enumerate(mlx_gemma.stream_generate(model, tokenizer, "Hello there", max_tokens=200)):
                if rank == 1 and n == 3:
                    if case == "dies":
                        os._exit(0)  # exit status 0: mlx.launch does not end the other rank for us
                    time.sleep(60)
        except RuntimeError as e:  # MLX's ring backend: "[ring] connection to a peer was lost"
            print(f"rank {rank}: RuntimeError: {e}", flush=True)
            raise SystemExit(4)
    raise SystemExit(f"rank {rank}: generation ended without an error")


if __name__ == "__main__":
    main()
