"""One choice's text as its events arrive: detokenized, stopped, split, with its logprobs.

`Choice.take(event)` feeds one scheduler Event through `mlx_gemma.prompts.RowText` (the same
incremental detokenizer and stop-string holding that `generate` uses, so a stop string is never
sent, even split across tokens), then through a chat reply's `Reply` (replies.py: Gemma 4
thoughts and tool calls taken out of the content), and returns what the event adds: content,
reasoning, whole tool calls and the raw logprobs of the tokens behind them.  The endpoint shapes
those for its API (responses.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..prompts import RowText
from .replies import Reply

# OpenAI writes a token with no probability (-inf) as -9999.0: JSON has no infinities.
_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    value = float(logprob)
    return value if value > _FLOOR else _FLOOR  # NaN and -inf become the floor


class GenerationFailed(Exception):
    """A job ended with finish_reason "error" (or was cancelled by the server): `message` says why."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list  # [(token id, logprob)], likeliest first


@dataclass
class Delta:
    """What one event adds to a choice."""

    text: str = ""  # content
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reasoning: str = ""  # Gemma 4 thoughts (when thinking is on)
    tool_calls: list[dict] = field(default_factory=list)  # whole calls, OpenAI's {index, id, type, function}


class Choice:
    """The state of one choice: its text so far, token count, logprobs and finish reason."""

    def __init__(self, tokenizer, stop_ids: frozenset, stop_strings: tuple, logprobs: bool, reply: Reply):
        self.row = RowText(tokenizer, stop_ids, stop_strings, skip_special_tokens=False)
        self.stop_ids, self.wants_logprobs, self.reply = stop_ids, logprobs, reply
        self.thinking = reply.thoughts is not None  # whether the reply has a reasoning field
        self.parts: list[str] = []
        self.reasoning_parts: list[str] = []
        self.tool_calls: list[dict] = []
        self.logprobs: list[TokenLogprob] = []
        self.tokens = 0  # generated tokens, a stop id included (it was generated)
        self.finish_reason: str | None = None
        self.prompt_tokens = self.cached_tokens = 0
        self.speculative: tuple[int, int] | None = None  # (proposed, accepted) when its job speculated

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def reasoning(self) -> str:
        return "".join(self.reasoning_parts)

    def take(self, event) -> Delta:
        """What `event` adds; sets `finish_reason` when the choice is over ("tool_calls" when it
        stopped after calls; "length" stays "length", calls or not)."""
        if event.finish_reason in ("error", "cancelled"):
            raise GenerationFailed(event.error or f"the generation was {event.finish_reason}")
        self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
        self.cached_tokens = event.cached_tokens or self.cached_tokens
        self.speculative = event.speculative or self.speculative
        text, logprobs, reason = "", [], None
        if event.token is not None:
            self.tokens += 1
            text, stop = self.row.add(event.token)
            if self.wants_logprobs and event.token not in self.stop_ids and event.logprob is not None:
                top = [(int(t), _finite(lp)) for t, lp in event.top_logprobs or []]
                logprobs.append(TokenLogprob(event.token, _finite(event.logprob), top))
            reason = None if stop is None else "stop"
        if reason is None and event.finish_reason is not None:
            tail, stop = self.row.finish()
            text += tail
            reason = "stop" if stop or event.finish_reason == "stop" else "length"
        delta = self._split(text, reason is not None)
        delta.logprobs = logprobs
        self.logprobs += logprobs
        if reason is not None:
            self.finish_reason = "tool_calls" if self.tool_calls and reason == "stop" else reason
        return delta

    def _split(self, text: str, final: bool) -> Delta:
        """The Delta of new text: its content, reasoning and calls (replies.py)."""
        events = self.reply.feed(text) + (self.reply.finish() if final else [])
        delta = Delta("".join(e.get("content", "") for e in events), [],
                      "".join(e.get("reasoning", "") for e in events), [e["tool_call"] for e in events if "tool_call" in e])
        if delta.text:
            self.parts.append(delta.text)
        if delta.reasoning:
            self.reasoning_parts.append(delta.reasoning)
        self.tool_calls += delta.tool_calls
        return delta
