"""Gemma 4's chat format, written out in code: a conversation as special-token ids and text.

`GemmaTokenizer.apply_chat_template` renders Gemma 1-3's `<start_of_turn>` format itself and
Gemma 4's through `gemma4_segments` here; neither runs a checkpoint's Jinja.  The rules are those
of Google's Gemma 4 chat template (the "Canonical Chat Template" of 2026-07-09, as shipped in the
gemma-4-*-it folders' chat_template.jinja), for conversations without tools:

    <bos><|turn>system\\n[<|think|>\\n]{system, trimmed}<turn|>\\n     (only with a system message or thinking)
    <|turn>user\\n{text, trimmed; <|image|> <|audio|> <|video|> for media parts}<turn|>\\n
    <|turn>model\\n{reply without its <|channel>...<channel|> thoughts, trimmed}<turn|>\\n
    <|turn>model\\n[<|channel>thought\\n<channel|>]                  (add_generation_prompt)

* `assistant` is rendered as the role `model`; consecutive assistant messages are one model turn.
* `enable_thinking` (default False, as the template's `enable_thinking | default(false)`) puts
  `<|think|>` first in the system turn.  With thinking off, the 26B / 31B templates close an empty
  thought channel after the generation prompt while the E2B / E4B ones do not (`empty_thought`).
* An assistant message's `reasoning` / `reasoning_content` after the last user message is kept
  as `<|channel>thought\\n...\\n<channel|>`; earlier thoughts are dropped, as the template does.
* Tool declarations, calls and responses are not rendered: a `tool` message or a `tool_calls` /
  `tool_responses` field is a typed error, never dropped in silence.

The same module holds what both formats check: the message list and the text's Unicode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import GenerationError, TokenizerError
from .json_input import json_type

# The turn markers that tell a Gemma 4 vocabulary from Gemma 1-3's <start_of_turn> / <end_of_turn>.
GEMMA4_TURN, GEMMA4_END_TURN = "<|turn>", "<turn|>"
# What a Gemma 4 model may end a reply with: transformers' generation_config for Gemma 4 lists
# <eos>, <turn|> and <|tool_response> (transformers 5.25 modeling_gguf_pytorch_utils.py).
GEMMA4_STOP_PIECES = ("<turn|>", "<|tool_response>")
# The generation prompt of a template that closes an empty thought channel (26B / 31B), as it
# appears in the Jinja source, with its newline escaped or not.
_EMPTY_THOUGHT_MARKS = ("<|channel>thought\\n<channel|>", "<|channel>thought\n<channel|>")
_SYSTEM_ROLES = ("system", "developer")
_ROLES = ("user", "assistant", "model", *_SYSTEM_ROLES)
# Content-part types and the placeholder each becomes (the OpenAI-style names the template accepts too).
_MEDIA_PIECES = {"image": "<|image|>", "image_url": "<|image|>", "audio": "<|audio|>",
                 "input_audio": "<|audio|>", "video": "<|video|>"}
_TOOL_FIELDS = ("tool_calls", "tool_responses")


@dataclass(frozen=True)
class Gemma4Vocab:
    """The ids Gemma 4's format uses; a piece the vocabulary lacks is None."""

    bos: int  # <bos>
    turn: int  # <|turn>: opens a turn, followed by the role and "\n"
    end_turn: int  # <turn|>: closes a turn, followed by "\n"
    think: int | None  # <|think|>: thinking mode on, first in the system turn
    channel: int | None  # <|channel>: opens a thought ("thought\n...")
    end_channel: int | None  # <channel|>: closes it
    media: dict  # {"<|image|>": id or None, "<|audio|>": ..., "<|video|>": ...}

    @classmethod
    def from_lookup(cls, bos: int, piece_id: Callable[[str], int | None]) -> Gemma4Vocab | None:
        """The ids through `piece_id` (None for a missing piece); None if this is no Gemma 4 vocabulary."""
        turn, end_turn = piece_id(GEMMA4_TURN), piece_id(GEMMA4_END_TURN)
        if turn is None or end_turn is None:
            return None
        media = {p: piece_id(p) for p in set(_MEDIA_PIECES.values())}
        return cls(bos, turn, end_turn, piece_id("<|think|>"), piece_id("<|channel>"), piece_id("<channel|>"), media)


def primes_empty_thought(template: str) -> bool:
    """Whether a Gemma 4 chat template (Jinja source) opens the model's turn with an empty thought
    channel when thinking is off: the 26B / 31B templates do, the E2B / E4B ones do not."""
    return any(mark in template for mark in _EMPTY_THOUGHT_MARKS)


def check_unicode(text: str, what: str) -> str:
    """`text`, if SentencePiece can take it: a lone surrogate (from JSON's "\\ud800", or
    surrogateescape'd bytes) has no UTF-8 form."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise GenerationError(f"{what} is not valid Unicode: {e.reason} at position {e.start}") from None
    return text


def check_messages(messages) -> list[Mapping]:
    """`messages` as a list, if it is a non-empty list of dicts with a string 'role' and a 'content'."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                              f"got {type(messages).__name__}")
    messages = list(messages)
    if not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise GenerationError(f"message {i} must be a dict with 'role' and 'content'")
        if not isinstance(m["role"], str):
            raise GenerationError(f"message {i}: 'role' must be a string, found {json_type(m['role'])}")
    return messages


def gemma4_segments(vocab: Gemma4Vocab, messages, add_generation_prompt: bool, enable_thinking: bool,
                    empty_thought: bool, path: str | None) -> list:
    """The conversation in Gemma 4's format, as a list of special-token ids (int) and text (str)."""
    messages = check_messages(messages)
    _check_roles(messages)
    if enable_thinking and vocab.think is None:
        raise TokenizerError(path, "vocabulary has no <|think|>: this model has no thinking mode")
    segments: list = [vocab.bos]
    rest, system = messages, messages[0]["role"] in _SYSTEM_ROLES
    if enable_thinking or system:
        segments += [vocab.turn, "system\n"]
        if enable_thinking:
            segments += [vocab.think, "\n"]
        if system:
            segments += _system_content(messages[0]["content"])
            rest = messages[1:]
        segments += [vocab.end_turn, "\n"]
    offset = len(messages) - len(rest)
    last_user = max((i for i, m in enumerate(rest) if m["role"] == "user"), default=-1)
    for i in range(len(rest)):
        segments += _turn(vocab, rest, i, i > last_user, offset, path)
    if add_generation_prompt:
        segments += [vocab.turn, "model\n"]
        if empty_thought and not enable_thinking:
            segments += _thought(vocab, "", path)
    return segments


def _check_roles(messages: list[Mapping]) -> None:
    for i, m in enumerate(messages):
        if m["role"] == "tool" or any(m.get(k) for k in _TOOL_FIELDS):
            raise GenerationError(f"message {i}: tool use (a 'tool' message, 'tool_calls', 'tool_responses') "
                                  "is not rendered by mlx_gemma's Gemma 4 chat format")
        if m["role"] not in _ROLES:
            raise GenerationError(f"message {i} has role {m['role']!r}; Gemma 4's roles are {', '.join(_ROLES)}")


def _system_content(content) -> list:
    # A list of parts: each text trimmed and followed by a space, as the template joins them.
    if isinstance(content, str):
        return [check_unicode(content, "message 0: 'content'").strip()]
    if not isinstance(content, Sequence) or not all(
            isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        raise GenerationError("message 0: a system message's content must be a string or a list of text parts")
    return [check_unicode(p["text"], f"message 0: content part {j}'s 'text'").strip() + " "
            for j, p in enumerate(content)]


def _turn(vocab: Gemma4Vocab, messages: list[Mapping], i: int, after_last_user: bool, offset: int,
          path: str | None) -> list:
    """One message's turn.  Consecutive assistant messages share a turn: the template neither closes
    the first nor opens the second (its `continue_same_model_turn` / `continues_into_next`)."""
    m, index = messages[i], i + offset
    role = "model" if m["role"] == "assistant" else m["role"]
    before = messages[i - 1]["role"] if i else None
    after = messages[i + 1]["role"] if i + 1 < len(messages) else None
    out: list = [] if role == "model" and before == "assistant" else [vocab.turn, f"{role}\n"]
    thought = m.get("reasoning") or m.get("reasoning_content")
    if thought and after_last_user:
        if not isinstance(thought, str):
            raise GenerationError(f"message {index}: 'reasoning' must be a string, found {json_type(thought)}")
        out += _thought(vocab, f"{check_unicode(thought, f'message {index}: reasoning')}\n", path)
    out += _content(vocab, m["content"], role == "model", index, path)
    if not (role == "model" and after == "assistant"):
        out += [vocab.end_turn, "\n"]
    return out


def _thought(vocab: Gemma4Vocab, text: str, path: str | None) -> list:
    if vocab.channel is None or vocab.end_channel is None:
        raise TokenizerError(path, "vocabulary has no <|channel>/<channel|>: this model has no thought channel")
    return [vocab.channel, "thought\n" + text, vocab.end_channel]


def _content(vocab: Gemma4Vocab, content, model: bool, index: int, path: str | None) -> list:
    if isinstance(content, str):
        return [_text(content, model, f"message {index}: 'content'")]
    if not isinstance(content, Sequence):
        raise GenerationError(f"message {index}: content must be a string or a list of parts, "
                              f"found {json_type(content)}")
    out: list = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append(_text(part["text"], model, f"message {index}: content part {j}'s 'text'"))
        elif kind in _MEDIA_PIECES:
            piece = _MEDIA_PIECES[kind]
            if vocab.media[piece] is None:
                raise TokenizerError(path, f"vocabulary has no {piece}: this model cannot take {kind} parts")
            out.append(vocab.media[piece])
        else:
            raise GenerationError(f"message {index}: unsupported content part {j}: {part!r:.80}")
    return out


def _text(text: str, model: bool, what: str) -> str:
    """A text, trimmed; in a model turn without its thoughts (the template's strip_thinking:
    of each piece ending at <channel|>, what comes before its <|channel>)."""
    check_unicode(text, what)
    if model:
        text = "".join(part.split("<|channel>")[0] for part in text.split("<channel|>"))
    return text.strip()
