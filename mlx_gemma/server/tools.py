"""A chat request's tool use: its `tools` and `tool_choice` checked, what the reply is parsed in, and
the grammar a reply must follow.

The prompt itself is `mlx_gemma.tool_calls.render_chat` (each model's own function-calling format:
Gemma 4's tool tokens, FunctionGemma's, Gemma 1-3's prompted JSON).  `tool_choice`:
- "none": no tools declared, the reply is all content (not parsed for calls); a `response_format`
  holds as without tools;
- "auto" (the default): all declared, the reply parsed for calls and free; beside a `response_format`
  (json_object / json_schema) it is either calls or that JSON, by one grammar;
- "required" / a named function: as "auto" (a named function declared alone), and the reply is
  whole calls in the model's syntax with arguments valid against their schemas
  (`tool_calls.call_grammar`, enforced by mlx_gemma.grammar); `parallel_tool_calls: false` allows one.
  With Gemma 4's thinking on (`chat_template_kwargs.enable_thinking`) one thought may come first,
  returned as `reasoning_content` (replies.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GenerationError
from ..grammar import compile_lark, compile_response_format, response_schema
from ..tool_calls import ToolCallFormat, call_grammar, check_tools, select_tools, tool_format_for
from .api_errors import ApiError
from .schemas import ChatRequest


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses tools."""

    fmt: ToolCallFormat  # the model's call format (the prompt's and the reply's)
    parse: bool  # whether replies are parsed for calls (tools declared)
    stop_ids: frozenset  # the id the model writes after its calls to await their results, if a token
    grammar: str | None  # llguidance grammar of every reply (forced calls, or calls | JSON); None: free


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
    except GenerationError as e:
        raise ApiError(400, str(e), "tool_choice", "invalid_value") from None
    try:
        answer = None
        if request.response_format is not None and compile_response_format(request.response_format, tokenizer):
            answer = response_schema(request.response_format)  # compiled alone first: faults name this field
    except GenerationError as e:
        raise ApiError(400, str(e), "response_format", "invalid_value") from None
    try:
        thinking = bool(request.chat_template_kwargs and request.chat_template_kwargs.enable_thinking)
        lark = call_grammar(tokenizer, fmt, tools, request.tool_choice, answer, request.parallel_tool_calls is not False,
                            thinking)  # (Gemma 4 thinking: a forced call may follow a thought)
        grammar = compile_lark(lark, tokenizer, "tools") if lark is not None else None
    except GenerationError as e:
        raise ApiError(400, str(e), "tools", "invalid_value") from None
    stop = tokenizer.piece_to_id(fmt.response_start) if fmt.response_start and declared else None
    return ToolPlan(fmt, bool(declared), frozenset() if stop is None else frozenset({stop}), grammar)
