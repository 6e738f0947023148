"""One rank of `mlx.launch ... python tests/distributed_scripts/server_rank.py DIR SERVER-ARGS...`
(tests/test_distributed_server.py): writes this rank's pid to DIR/rank<r>.pid, runs the server's
command line (`python -m mlx_gemma.server SERVER-ARGS`), then writes its exit status to
DIR/rank<r>.exit, so the test can signal rank 0 alone and see how every rank ended."""

import os
import sys
from pathlib import Path

import mlx.core as mx

from mlx_gemma.server.cli import main

folder = Path(sys.argv[1])
rank = mx.distributed.init().rank()
(folder / f"rank{rank}.pid").write_text(str(os.getpid()))
status = main(sys.argv[2:])
(folder / f"rank{rank}.exit").write_text(str(status))
sys.exit(status)
