"""OpenAI's response objects, shaped field for field: chat completions, completions, their stream
chunks, usage and the two logprobs formats (chat's `content` list, completions' legacy columns).
"""

from __future__ import annotations

import time
import uuid

from .choices import Choice, Delta, TokenLogprob

CHAT, COMPLETION = "chat.completion", "text_completion"


class Envelope:
    """The fields every object of one response shares: id, created, model, object."""

    def __init__(self, kind: str, model: str, tokenizer):
        prefix = "chatcmpl" if kind == CHAT else "cmpl"
        self.id, self.created = f"{prefix}-{uuid.uuid4().hex}", int(time.time())
        self.kind, self.model, self.tokenizer = kind, model, tokenizer

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    # ----- whole responses ----------------------------------------------------------------

    def full(self, choices: list[Choice], usage: dict) -> dict:
        return {**self._head(self.kind), "choices": [self._full_choice(i, c) for i, c in enumerate(choices)],
                "usage": usage}

    def _full_choice(self, index: int, choice: Choice) -> dict:
        logprobs = self.logprobs(choice.logprobs, 0) if choice.wants_logprobs else None
        if self.kind == CHAT:
            return {"index": index, "message": _message(choice), "logprobs": logprobs,
                    "finish_reason": choice.finish_reason}
        return {"index": index, "text": choice.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}

    # ----- stream chunks ------------------------------------------------------------------

    def chunk(self, index: int, choice: Choice, delta: Delta, first: bool, offset: int, usage: bool) -> dict:
        """The chunk for one event of one choice; `offset` is the choice's text length before it."""
        logprobs = self.logprobs(delta.logprobs, offset) if choice.wants_logprobs else None
        if self.kind == CHAT:
            body = {"role": "assistant"} if first else {}
            if delta.reasoning:
                body["reasoning_content"] = delta.reasoning
            if delta.tool_calls:  # each call whole, in one chunk (OpenAI streams its arguments in pieces)
                body["tool_calls"] = delta.tool_calls
            if delta.text or not (delta.reasoning or delta.tool_calls):
                body["content"] = delta.text
            entry = {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": choice.finish_reason}
            name = "chat.completion.chunk"
        else:
            entry = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": choice.finish_reason}
            name = COMPLETION
        out = {**self._head(name), "choices": [entry]}
        if usage:
            out["usage"] = None  # OpenAI: null on every chunk but the last when include_usage is set
        return out

    def usage_chunk(self, usage: dict) -> dict:
        name = "chat.completion.chunk" if self.kind == CHAT else COMPLETION
        return {**self._head(name), "choices": [], "usage": usage}

    # ----- logprobs -----------------------------------------------------------------------

    def logprobs(self, entries: list[TokenLogprob], offset: int) -> dict:
        if self.kind == CHAT:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        tokens, offsets = [], []
        for e in entries:
            offsets.append(offset)
            text = token_text(self.tokenizer, e.token)[0]
            tokens.append(text)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token_text(self.tokenizer, t)[0]: lp for t, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _chat_entry(self, e: TokenLogprob) -> dict:
        text, raw = token_text(self.tokenizer, e.token)
        top = []
        for t, lp in e.top:
            t_text, t_raw = token_text(self.tokenizer, t)
            top.append({"token": t_text, "logprob": lp, "bytes": t_raw})
        return {"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top}


def _message(choice: Choice) -> dict:
    """A whole chat reply as OpenAI's assistant message: content null when the reply is only calls;
    `reasoning_content` (vLLM's name) when the request turned thinking on."""
    content = choice.text
    out = {"role": "assistant", "content": None if choice.tool_calls and not content.strip() else content,
           "refusal": None}
    if choice.thinking:
        out["reasoning_content"] = choice.reasoning or None
    if choice.tool_calls:  # a whole message's calls carry no stream index
        out["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in choice.tool_calls]
    return out


def usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    """OpenAI's usage object; cached_tokens is what the scheduler reused of the prompt.  When a choice
    speculated, `speculative` (ours, not OpenAI's) sums the tokens proposed and those the model kept."""
    completion = sum(c.tokens for c in choices)
    cached = max((c.cached_tokens for c in choices), default=0)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
           "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}
    speculated = [c.speculative for c in choices if c.speculative is not None]
    if speculated:
        out["speculative"] = {"proposed": sum(p for p, _ in speculated), "accepted": sum(a for _, a in speculated)}
    return out


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token's text and its UTF-8 bytes, as OpenAI's logprobs show one token.

    A SentencePiece byte piece (<0xE2>) is a lone byte of a longer character: its text is written
    "bytes:\\xe2" as OpenAI writes such tokens, and `bytes` holds the byte itself.  An id past the
    tokenizer (Gemma 3 pads its embedding table) has no text.
    """
    if not 0 <= token < tokenizer.vocab_size:
        return "", []
    piece = tokenizer.id_to_piece(token)
    if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:
        try:
            value = int(piece[3:5], 16)
        except ValueError:
            value = None
        if value is not None:
            return f"bytes:\\x{value:02x}", [value]
    text = piece.replace("\u2581", " ")  # SentencePiece's word-boundary mark is a space
    return text, list(text.encode("utf-8"))
