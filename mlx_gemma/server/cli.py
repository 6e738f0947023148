"""The command line: `python -m mlx_gemma.server --model M [--model M2 ...]` (or `mlx_gemma-server`).

Flags follow mlx-lm's server where they apply (--model, --adapter-path, --host, --port,
--allowed-origins comma-separated, --temp/--top-p/--top-k/--min-p/--max-tokens as defaults,
--prefill-step-size, --prompt-cache-bytes, the KV-cache flags, --draft-model / --num-draft-tokens with our
--prompt-lookup (server/speculation.py), --log-level).  The default host is loopback.  The port
actually bound (`--port 0` picks a free one) is printed as "serving on http://HOST:PORT".
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence

import mlx.core as mx
import uvicorn

from ..api import load
from ..batching import Scheduler
from ..prefix_cache import DEFAULT_BYTES as DEFAULT_PREFIX_CACHE_BYTES
from ..cli import add_cache_flags, error_line, kv_options_from
from ..distributed import job_messages, serving
from ..distributed.cli import add_distributed_flags, distributed_from, running
from ..errors import MlxGemmaError
from ..models.embedding_gemma import Model as EncoderModel
from ..samplers import SamplingSettings
from .app import DEFAULT_MAX_BODY_BYTES, create_app
from .embeddings import Embedder
from .served import Defaults, ServedModel
from .speculation import ServerSpeculation, add_flags as add_speculation_flags

API_KEY_ENV = "MLX_GEMMA_API_KEY"


def byte_size(text: str) -> int:
    """A byte count as mlx-lm's --prompt-cache-bytes takes it: digits, then nothing, M / MB or G / GB (10**6, 10**9)."""
    units = {"": 1, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    number = text.strip().rstrip("bBgGmM ")
    unit = text.strip()[len(number):].strip().upper()
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r:.40} (e.g. 1000000, 512M, 2G)") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a byte count must be >= 0, got {text!r:.40}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma.server",
                                description="An OpenAI-compatible HTTP server for Gemma models (flags follow mlx_lm.server).")
    p.add_argument("--model", action="append", required=True, metavar="M",
                   help="model folder or hub repo id; repeat to serve several (clients name each as given here)")
    p.add_argument("--adapter-path", help="LoRA adapter folder to apply (with a single --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8080, help="port (0: any free one; the chosen one is printed)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every path but /health (or set {API_KEY_ENV})")
    p.add_argument("--allowed-origins", type=lambda s: [o.strip() for o in s.split(",") if o.strip()], default=[],
                   help="comma-separated origins allowed by CORS ('*' for any; default: CORS off)")
    p.add_argument("--allow-media-dir", "--allow-image-dir", dest="allow_image_dir", metavar="DIR",
                   help="accept local image and video paths (plain or file://) inside DIR; data URLs are always "
                        "accepted (--allow-image-dir: the old name)")
    p.add_argument("--max-batch", type=int, default=8, help="most rows decoded at once per model")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="largest request body")
    p.add_argument("--prefill-step-size", type=int, default=None, help="prompt positions per prefill chunk")
    p.add_argument("--prompt-cache-bytes", type=byte_size, default=DEFAULT_PREFIX_CACHE_BYTES,
                   help="bytes of KV caches kept across requests for prefix reuse, per model (512M, 2G; "
                        "0 turns it off; default 1 GiB)")
    p.add_argument("--max-tokens", type=int, default=Defaults.max_tokens, help="default max_tokens of a request")
    p.add_argument("--temp", type=float, default=Defaults.temp, help="default temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=Defaults.top_p, help="default top_p")
    p.add_argument("--top-k", type=int, default=Defaults.top_k, help="default top_k (0 = off)")
    p.add_argument("--min-p", type=float, default=Defaults.min_p, help="default min_p (0 = off)")
    add_cache_flags(p)
    add_speculation_flags(p)
    add_distributed_flags(p)  # rank 0 serves HTTP, the others follow its batches (distributed/serving.py)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    return p


def defaults_from(args) -> Defaults:
    """The request defaults of the flags, checked as the samplers check them."""
    SamplingSettings(args.temp, args.top_k, args.top_p, args.min_p)
    if args.max_tokens < 1:
        raise MlxGemmaError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    return Defaults(args.temp, args.top_p, args.top_k, args.min_p, args.max_tokens)


def serve_models(args, dist: dict | None = None) -> list[ServedModel]:
    """Load and start each --model (a scheduler, with its own MLX thread, per model); with `dist`
    (mlx.launch's ranks) rank 0's, or on a later rank follow rank 0 until it closes."""
    dist = dist or {}
    if args.adapter_path and len(args.model) > 1:
        raise MlxGemmaError("--adapter-path applies to one model: give a single --model with it")
    if len(set(args.model)) != len(args.model):
        raise MlxGemmaError("the same --model is given twice")
    kv = kv_options_from(args)
    # The draft model, loaded once (across ranks on rank 0 only: distributed/speculation.py).
    speculation = ServerSpeculation(args, load_draft=not dist or dist["group"].rank() == 0)
    served = []
    for name in args.model:
        model, tokenizer = load(name, adapter_path=args.adapter_path, **dist)
        # Every weight materialized here: a lazy array left for the scheduler's thread would be
        # evaluated on a stream of this thread, which MLX refuses there (seen with tiny_gemma4_mm).
        mx.eval(model.parameters())
        options = dict(max_batch=args.max_batch, prefill_chunk=args.prefill_step_size, kv_options=kv,
                       prefix_cache_bytes=args.prompt_cache_bytes)
        if dist and isinstance(model, EncoderModel):
            raise MlxGemmaError(f"an embedding model {job_messages.NOT_ACROSS}")
        if not isinstance(model, EncoderModel):  # a row decoding alone speculates (server/speculation.py)
            options["policy"] = speculation.policy(tokenizer, dist.get("group"))
        if dist and dist["group"].rank() > 0:
            serving.follow(model, options, dist["group"], tokenizer)
            return []
        if isinstance(model, EncoderModel):  # EmbeddingGemma: /v1/embeddings
            served.append(ServedModel(name, model, tokenizer, None, int(time.time()), Embedder(model, tokenizer)))
            continue
        scheduler = serving.LeaderScheduler(model, dist["group"], **options) if dist else Scheduler(model, **options)
        scheduler.start()
        served.append(ServedModel(name, model, tokenizer, scheduler, int(time.time())))
    return served


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (IPv6 when the host is one); port 0 takes any free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    served = []
    try:
        defaults = defaults_from(args)
        if args.max_body_bytes < 1024:
            raise MlxGemmaError(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
        if args.allow_image_dir is not None and not os.path.isdir(args.allow_image_dir):
            raise MlxGemmaError(f"--allow-media-dir {args.allow_image_dir}: no such folder")
        dist = distributed_from(args)
        if dist:
            job_messages.check_served(args)
        if dist and dist["group"].rank() > 0:  # a follower: no HTTP, rank 0's batches until it closes
            serve_models(args, dist)
            return 0
        sock = bind(args.host, args.port)
        served = serve_models(args, dist)
        app = create_app(served, api_key=api_key, allowed_origins=args.allowed_origins,
                         max_body_bytes=args.max_body_bytes, defaults=defaults,
                         allow_image_dir=args.allow_image_dir)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving on http://{shown}:{port}", flush=True)
        config = uvicorn.Config(app, log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
        if dist:
            serving.ignore_signals()  # uvicorn's own while it serves; after it, close reaches the other ranks
        with running(dist, "serving"):
            uvicorn.Server(config).run(sockets=[sock])
            # Still under the watchdog: closing waits for the MLX thread, which a lost peer can hold in a
            # collective for ever (MLX 0.32's ring: an all_sum begun after "Failing pending tasks").
            close_models(served)
        return 0
    except (MlxGemmaError, OSError) as e:
        print(error_line(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        close_models(served)


def close_models(served: list) -> None:
    """Close each served model's scheduler and embedder, once (the list is emptied)."""
    while served:
        m = served.pop()
        if m.scheduler is not None:
            m.scheduler.close()
        if m.embedder is not None:
            m.embedder.close()


if __name__ == "__main__":
    sys.exit(main())
