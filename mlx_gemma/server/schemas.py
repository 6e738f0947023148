"""The request bodies the server accepts, as strict pydantic models.

Each model mirrors an OpenAI request object field for field, with OpenAI's ranges.  Validation is
strict (no "0.5" for a number, no 1 for a boolean) and unknown fields are refused, as OpenAI's own
API refuses them ("Unrecognized request argument").  A few OpenAI fields that change nothing a
local server does (`user`, `metadata`, `store`, `service_tier`) are accepted
and ignored; fields naming a feature this server does not have yet (audio output, the legacy
`functions`) are accepted here and refused by `prepare.py` with a clear message.  Tools, tool
calls, tool results and `response_format` are shaped by OpenAI's spec and checked where they are
used (mlx_gemma/tool_formats/checks.py, mlx_gemma/grammar.py), each error naming its field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, model_validator

# OpenAI's limits: four stop strings, logit_bias in [-100, 100], top_logprobs <= 20 (chat),
# logprobs <= 5 (completions), penalties in [-2, 2], temperature in [0, 2].
MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n: a local server's rows are few (OpenAI allows 128)
MAX_PROMPTS = 16  # /v1/completions prompts per request
MAX_MESSAGES = 1024
MAX_LOGIT_BIAS = 1024  # entries
MAX_DRAFT_TOKENS = 32  # num_draft_tokens and prompt_lookup's n-gram length: more never pays
MAX_EMBEDDING_INPUTS = 256  # texts per /v1/embeddings request (OpenAI allows 2048)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageUrl(_Strict):
    url: Annotated[str, Field(min_length=1)]  # a data URL, or a path under --allow-image-dir
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint: each model has one size


class ImageUrlPart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Strict):
    data: Annotated[str, Field(min_length=1)]  # base64 of the file
    format: Literal["wav", "mp3", "flac", "ogg"]


class InputAudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoUrl(_Strict):
    url: Annotated[str, Field(min_length=1)]  # a data URL (data:video/...), or a path under --allow-media-dir


class VideoUrlPart(_Strict):
    """vLLM's and mlx-vlm's video part (Gemma 4)."""

    type: Literal["video_url"]
    video_url: VideoUrl


class FilePart(BaseModel):
    """OpenAI's file part: refused in prepare.py (its shape is not checked here)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["file"]


ContentPart = Annotated[Union[TextPart, ImageUrlPart, InputAudioPart, VideoUrlPart, FilePart],
                        Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[StrictStr, list[ContentPart], None] = None
    name: StrictStr | None = None  # a tool message: the function answered; otherwise accepted, not rendered
    # An assistant's earlier calls and a tool message's answer (checked in tool_formats/checks.py).
    tool_calls: list[Any] | None = None
    tool_call_id: StrictStr | None = None
    function_call: Any = None
    refusal: StrictStr | None = None  # an assistant message echoed back by a client
    # Gemma 4 thoughts kept in an assistant turn (mlx_gemma.chat_template renders them).
    reasoning_content: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's padding field: nothing to pad on loopback


class ChatTemplateKwargs(_Strict):
    """The chat-template switches a client may set (vLLM's and mlx-lm's `chat_template_kwargs`)."""

    enable_thinking: bool = False  # Gemma 4's thinking mode; refused on Gemma 1-3


class _Sampling(_Strict):
    """The fields both endpoints share: what to sample, how much, where to stop."""

    model: StrictStr
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None  # not OpenAI's; vLLM's and mlx-lm's
    min_p: Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0, allow_inf_nan=False)] | None = None
    logit_bias: Annotated[dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]],
                          Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
    stop: Union[Annotated[str, Field(min_length=1)],
                Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)],
                None] = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    # Speculative decoding, not OpenAI's (server/speculation.py): mlx-lm's server reads num_draft_tokens
    # per request (0: none for this request); prompt_lookup is ours (true, an n-gram length, or false).
    num_draft_tokens: Annotated[int, Field(ge=0, le=MAX_DRAFT_TOKENS)] | None = None
    prompt_lookup: Union[bool, Annotated[int, Field(ge=1, le=MAX_DRAFT_TOKENS)], None] = None
    # Accepted and ignored: they change nothing a local server does.
    user: StrictStr | None = None
    metadata: dict[str, StrictStr] | None = None
    store: bool | None = None
    service_tier: StrictStr | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    parallel_tool_calls: bool | None = None  # false: a forced tool_choice allows one call (tools.py)
    tools: list[Any] | None = None  # OpenAI function tools (server/tools.py)
    tool_choice: Any = None  # "none", "auto", "required" or {"type": "function", "function": {"name"}}
    # Refused with a clear message in prepare.py until their sessions land.
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    modalities: list[StrictStr] | None = None
    audio: Any = None
    reasoning_effort: StrictStr | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


PromptInput = Union[
    Annotated[str, Field(min_length=1)],
    Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],
    Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)],
    Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
              Field(min_length=1, max_length=MAX_PROMPTS)],
]


class CompletionRequest(_Sampling):
    prompt: PromptInput
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    # Refused unless at their no-op values (prepare.py): echo, suffix, best_of > n.
    echo: bool = False
    suffix: StrictStr | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None


class EmbeddingRequest(_Strict):
    model: StrictStr
    input: Union[
        Annotated[str, Field(min_length=1)],
        Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)],
        Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)],  # token ids: refused in embeddings.py
        Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]], Field(min_length=1)],
    ]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None  # Matryoshka: the first D components, renormalized
    prompt_name: StrictStr | None = None  # EmbeddingGemma's task prompts ("query", "document", ...); not OpenAI's
    user: StrictStr | None = None  # accepted and ignored
