"""A chat request's tool use: its `tools` and `tool_choice` checked, what the reply is parsed in, and
the tokens a reply is forced to start with.

The prompt itself is `mlx_gemma.tool_calls.render_chat` (each model's own function-calling format:
Gemma 4's tool tokens, FunctionGemma's, Gemma 1-3's prompted JSON).  `tool_choice`:
- "none": no tools declared, the reply is all content (not parsed for calls);
- "auto" (the default): all declared, the reply parsed for calls;
- "required" / a named function: as "auto" (a named function declared alone), and the reply is
  forced to begin with the format's call opening (`tool_calls.forced_prefix`: `<|tool_call>call:`,
  or `<|tool_call>call:NAME{` for a named one; Gemma 1-3: `{"name": "`) by a logits processor.
  Only that opening is enforced: that the call is then closed with well-formed arguments is not
  (a reply that breaks off stays content), since this forcing is no grammar.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import GenerationError
from ..tool_calls import ToolCallFormat, check_tools, forced_prefix, select_tools, tool_format_for
from .api_errors import ApiError
from .schemas import ChatRequest


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools."""

    fmt: ToolCallFormat  # the model's call format (the prompt's and the reply's)
    parse: bool  # whether replies are parsed for calls (tools declared)
    stop_ids: frozenset  # the id the model writes after its calls to await their results, if a token
    prefix: tuple  # ids every reply starts with (tool_choice required or named); () when free


def uses_tools(request: ChatRequest) -> bool:
    """Whether the request declares tools or carries earlier calls and their results."""
    return (request.tools is not None or request.tool_choice is not None
            or any(m.role == "tool" or m.tool_calls for m in request.messages))


def plan_tools(tokenizer, request: ChatRequest, model_name: str) -> ToolPlan:
    """The request's ToolPlan; an ApiError 400 for tools this model or request cannot have."""
    fmt = tool_format_for(tokenizer)
    if fmt is None:
        raise ApiError(400, f"the model `{model_name}` has no tool-call format (Gemma 1-4 and FunctionGemma chat "
                            "models have)", "tools", "unsupported_parameter")
    try:
        tools = check_tools(request.tools)
    except GenerationError as e:
        raise ApiError(400, str(e), "tools", "invalid_value") from None
    try:
        declared = select_tools(tools, request.tool_choice)
        prefix = forced_prefix(fmt, request.tool_choice) if declared else None
    except GenerationError as e:
        raise ApiError(400, str(e), "tool_choice", "invalid_value") from None
    stop = tokenizer.piece_to_id(fmt.response_start) if fmt.response_start and declared else None
    ids = tuple(tokenizer.encode(prefix, add_bos=False, parse_special=True)) if prefix else ()
    return ToolPlan(fmt, bool(declared), frozenset() if stop is None else frozenset({stop}), ids)


class ForcedPrefix:
    """A logits processor: a reply's first tokens are `ids`, whatever the model prefers.

    The history it is called with is the row's prompt and the tokens so far, so its length says
    which reply token comes next (no host read: the step stays pipelined)."""

    def __init__(self, ids: tuple, prompt_length: int):
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:  # tokens [1, n], logits [1, V]
        step = tokens.shape[1] - self.prompt_length
        if step >= len(self.ids):
            return logits
        keep = mx.arange(logits.shape[-1]) == self.ids[step]  # [V]
        return mx.where(keep, logits, mx.array(-mx.inf, logits.dtype))
