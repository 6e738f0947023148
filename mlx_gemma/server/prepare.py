"""A validated request turned into the scheduler's jobs: the prompt's ids, sampling, stops, budget.

Chat messages are rendered with the model's own chat format (`GemmaTokenizer.apply_chat_template`:
Gemma 1-3's turns or Gemma 4's, message text encoded as plain text so a user cannot forge a turn;
with tools, earlier calls or tool results, by `tool_calls.render_chat` in the model's own
function-calling format, see tools.py, media parts included);
completion prompts are encoded with <bos>, or taken as token ids.  A chat's `response_format`
(json_object / json_schema) becomes a `grammar.GrammarConstraint` per job (each choice its own
parser; a JSON reply from its first token, so no thoughts beside it).  Everything a user can get wrong
that pydantic cannot see (roles out of order, a token id past the vocabulary, a prompt past the
context, a feature this server does not have yet) becomes an `ApiError` 400 here, before any job
is submitted.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ..batch_speculation import SpeculationAsk
from ..batching import Job
from ..errors import MlxGemmaError
from ..grammar import GrammarConstraint, compile_response_format
from ..prompts import prompt_ids
from ..samplers import SamplingSettings
from ..tool_calls import ToolCallFormat, render_chat
from .api_errors import ApiError
from .media import NOT_YET, MediaParts, media_prompt, prefix_lm_prompt
from .schemas import ChatRequest, CompletionRequest, Message
from .served import Defaults, ServedModel
from .tools import ToolPlan, plan_tools, uses_tools


@dataclass(frozen=True)
class Prepared:
    """What the response side needs besides the jobs themselves."""

    jobs: list  # one Job per choice, in choice order
    prompt_tokens: int  # the request's prompt tokens (each prompt once, however many choices)
    stop_ids: frozenset  # ids that end a choice (the job's, for the text side)
    stop_strings: tuple  # strings that end a choice, never sent
    logprobs: bool  # whether choices carry logprobs
    top_logprobs: int  # alternatives per token
    thinking: bool = False  # Gemma 4's thinking was on: thoughts are split out of the reply
    tool_format: ToolCallFormat | None = None  # the format replies are parsed in for tool calls; None: not parsed


def prepare_chat(served: ServedModel, request: ChatRequest, defaults: Defaults,
                 media_dir: Path | None = None) -> Prepared:
    """The jobs of a chat request; image and audio parts are read under `media_dir` rules (media.py)."""
    _refuse_chat_features(request)
    thinking = request.chat_template_kwargs.enable_thinking if request.chat_template_kwargs else False
    tools = plan_tools(served.tokenizer, request, served.name) if uses_tools(request) else None
    grammar = _grammar(served, request, tools)
    with tempfile.TemporaryDirectory(prefix="mlx_gemma-request-") as folder:
        media = MediaParts(Path(folder), media_dir)
        messages = [_message_dict(m, i, media) for i, m in enumerate(request.messages)]
        if served.model.prefix_lm:  # PaliGemma: no chat template (media.py says what its prompt is)
            if tools is not None:
                raise ApiError(400, "PaliGemma has no function-calling format: it takes no tools", "tools",
                               "unsupported_parameter")
            ids, inputs = prefix_lm_prompt(served, messages, media, thinking, Path(folder))
        elif media.images or media.clips or media.videos:
            # with tools, rendered as _text_prompt renders them (render_chat), the media blocks spliced in
            declared = dict(tools=request.tools or [], tool_choice=request.tool_choice) if tools else {}
            ids, inputs = media_prompt(served, messages, media, thinking, Path(folder), **declared)
        else:
            ids, inputs = _text_prompt(served, messages, thinking, request if tools else None), None
    stop_ids = frozenset(served.tokenizer.eos_token_ids)
    if served.tokenizer.end_of_turn_id is not None and not served.model.prefix_lm:
        # a reply ends with its turn, as ChatSession stops (PaliGemma has no turns: <eos>, as generate)
        stop_ids |= {served.tokenizer.end_of_turn_id}
    if tools is not None:
        stop_ids |= tools.stop_ids
    limit = request.max_completion_tokens or request.max_tokens
    top = (request.top_logprobs or 0) if request.logprobs else 0
    prepared = _jobs(served, request, defaults, [ids], limit, stop_ids, request.logprobs, top, inputs,
                     _job_processors(served.tokenizer, grammar))
    return replace(prepared, thinking=thinking, tool_format=tools.fmt if tools and tools.parse else None)


def _text_prompt(served: ServedModel, messages: list[dict], thinking: bool, tools: ChatRequest | None) -> list[int]:
    """The prompt's ids: with the request's tools (`tools`: the request, when it uses them) by render_chat."""
    try:
        if tools is not None:
            return render_chat(served.tokenizer, messages, tools.tools, tools.tool_choice,
                               add_generation_prompt=True, tokenize=True, enable_thinking=thinking)
        return served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    enable_thinking=thinking)
    except MlxGemmaError as e:
        raise ApiError(400, str(e), "messages", "invalid_messages") from None


def _grammar(served: ServedModel, request: ChatRequest, tools: ToolPlan | None) -> str | None:
    """The grammar of every reply: the tool plan's (forced calls, or calls | the response_format's JSON),
    else the JSON grammar of the request's `response_format` (grammar.py; None for text)."""
    if tools is not None and tools.grammar is not None:
        return tools.grammar
    if request.response_format is None:
        return None
    try:
        return compile_response_format(request.response_format, served.tokenizer)
    except MlxGemmaError as e:
        raise ApiError(400, str(e), "response_format", "invalid_value") from None


def _job_processors(tokenizer, grammar: str | None):
    """`processors(prompt length)` for each job: the grammar's constraint (each job its own parser);
    None when the reply is free."""
    if grammar is None:
        return None

    def make(prompt_length: int) -> tuple:
        return (GrammarConstraint(tokenizer, grammar),)
    return make


def prepare_completion(served: ServedModel, request: CompletionRequest, defaults: Defaults) -> Prepared:
    if request.echo:
        raise ApiError(400, f"echo is {NOT_YET}", "echo", "unsupported_parameter")
    if request.suffix:
        raise ApiError(400, f"suffix (insertion) is {NOT_YET}", "suffix", "unsupported_parameter")
    if request.best_of is not None and request.best_of != request.n:
        raise ApiError(400, f"best_of other than n is {NOT_YET}", "best_of", "unsupported_parameter")
    prompts = request.prompt
    if isinstance(prompts, str) or isinstance(prompts[0], int):
        prompts = [prompts]
    rows = []
    for i, p in enumerate(prompts):
        try:
            rows.append(prompt_ids(served.tokenizer, p, chat=False, vocab_size=served.model.args.vocab_size))
        except MlxGemmaError as e:
            raise ApiError(400, f"prompt {i}: {e}", "prompt", "invalid_prompt") from None
    stop_ids = frozenset(served.tokenizer.eos_token_ids)
    wants = request.logprobs is not None
    return _jobs(served, request, defaults, rows, request.max_tokens, stop_ids, wants, request.logprobs or 0)


def _jobs(served, request, defaults: Defaults, rows: list[list[int]], limit, stop_ids, logprobs: bool,
          top: int, media: dict | None = None, processors=None) -> Prepared:
    """One Job per (prompt, choice), prompt-major as OpenAI numbers choices; `processors(prompt length)`
    makes each job's own logits processors (stateful ones: each job its own)."""
    limit = limit or defaults.max_tokens
    stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    bias = _logit_bias(request.logit_bias, served.model.args.vocab_size)
    jobs = []
    for p, ids in enumerate(rows):
        if len(ids) >= served.context:
            param = "messages" if isinstance(request, ChatRequest) else "prompt"
            raise ApiError(400, f"This model's maximum context length is {served.context} tokens, but the "
                                f"prompt{'' if len(rows) == 1 else f' {p}'} is {len(ids)} tokens. Shorten it.",
                           param, "context_length_exceeded")
        budget = min(limit, served.context - len(ids))  # the whole sequence must fit the context
        for c in range(request.n):
            seed = None if request.seed is None else (request.seed + c) % 2 ** 63  # n different draws
            jobs.append(Job(prompt_ids=list(ids), max_tokens=budget, sampling=_sampling(request, defaults, seed, bias),
                            stop_ids=stop_ids, top_logprobs=top, media=media,
                            processors=processors(len(ids)) if processors else (),
                            speculation=SpeculationAsk(request.num_draft_tokens, request.prompt_lookup)))
    return Prepared(jobs, sum(len(r) for r in rows), stop_ids, stops, logprobs, top)


def _sampling(request, defaults: Defaults, seed, bias) -> SamplingSettings:
    def pick(value, default):
        return default if value is None else value

    try:
        return SamplingSettings(
            temp=pick(request.temperature, defaults.temp), top_k=pick(request.top_k, defaults.top_k),
            top_p=pick(request.top_p, defaults.top_p), min_p=pick(request.min_p, defaults.min_p), seed=seed,
            repetition_penalty=request.repetition_penalty, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, logit_bias=bias)
    except MlxGemmaError as e:  # pydantic checked the ranges; this is a second line
        raise ApiError(400, str(e), None, "invalid_value") from None


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias: {key[:40]!r} is not a token id of this model (0..{vocab_size - 1})",
                           "logit_bias", "invalid_value")
        out[int(key)] = value
    return out


def _refuse_chat_features(request: ChatRequest) -> None:
    for name in ("functions", "function_call", "audio", "reasoning_effort"):
        if getattr(request, name) not in (None, []):
            raise ApiError(400, f"{name} is {NOT_YET}", name, "unsupported_parameter")
    if request.modalities not in (None, ["text"]):
        raise ApiError(400, f"modalities other than ['text'] are {NOT_YET}", "modalities", "unsupported_parameter")


def _message_dict(m: Message, i: int, media: MediaParts) -> dict:
    """A message as the chat template takes it: role and text (a string or parts; media as media.py reads them)."""
    where = f"messages.{i}"
    if m.role == "function" or m.function_call is not None:
        raise ApiError(400, f"{where}: the legacy function-call messages are {NOT_YET}: use tools", where,
                       "unsupported_content")
    if m.tool_calls is not None and m.role != "assistant":
        raise ApiError(400, f"{where}.tool_calls: only an assistant message has tool calls", f"{where}.tool_calls",
                       "invalid_value")
    if m.tool_call_id is not None and m.role != "tool":
        raise ApiError(400, f"{where}.tool_call_id: only a tool message answers a call", f"{where}.tool_call_id",
                       "invalid_value")
    if m.content is None and not m.tool_calls:
        raise ApiError(400, f"{where}.content: a message needs content", f"{where}.content", "invalid_value")
    content = m.content
    if isinstance(content, list):
        content = [{"type": "text", "text": p.text} if p.type == "text" else media.part(p, f"{where}.content.{j}")
                   for j, p in enumerate(content)]
    out = {"role": "system" if m.role == "developer" else m.role, "content": content}  # OpenAI's new name
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls  # checked where they are rendered (tool_formats/checks.py)
    if m.role == "tool":  # the call it answers: by id, or by the function's name
        out.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v is not None})
    if m.reasoning_content is not None:
        out["reasoning_content"] = m.reasoning_content  # Gemma 4 keeps the last turn's thoughts
    return out
