"""An OpenAI-compatible HTTP server for the Gemma models mlx_gemma runs (issue 21).

    python -m mlx_gemma.server --model path/to/gemma-3-1b-it --port 8080

FastAPI on uvicorn, strict pydantic request models, server-sent events through sse-starlette.
The files, in the order a request meets them: `app.py` (routes, auth, body limit, errors),
`schemas.py` (the request models), `prepare.py` (a request to the scheduler's jobs),
`tools.py` (tools and tool_choice), `media.py` (image and audio parts to model inputs),
`bridge.py` (scheduler callbacks to the event loop), `choices.py` (events to text, stops,
logprobs), `replies.py` (thoughts and tool calls out of a reply), `responses.py` (OpenAI's response
shapes), `generation.py` (JSON or a stream); `embeddings.py` (/v1/embeddings, EmbeddingGemma);
`cli.py` loads the models and runs uvicorn.
"""

from .app import create_app
from .cli import main
from .served import Defaults, ServedModel

__all__ = ["create_app", "main", "Defaults", "ServedModel"]
