"""One choice's text as its events arrive: detokenized, stopped, with its logprobs.

`Choice.take(event)` feeds one scheduler Event through `mlx_gemma.prompts.RowText` (the same
incremental detokenizer and stop-string holding that `generate` uses, so a stop string is never
sent, even split across tokens) and returns what the event adds: text and the raw logprobs of
the tokens behind it.  The endpoint shapes those for its API (responses.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..prompts import RowText

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

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Choice:
    """The state of one choice: its text so far, token count, logprobs and finish reason."""

    def __init__(self, tokenizer, stop_ids: frozenset, stop_strings: tuple, logprobs: bool):
        self.row = RowText(tokenizer, stop_ids, stop_strings, skip_special_tokens=False)
        self.stop_ids, self.wants_logprobs = stop_ids, logprobs
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.tokens = 0  # generated tokens, a stop id included (it was generated)
        self.finish_reason: str | None = None
        self.prompt_tokens = self.cached_tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def take(self, event) -> Delta:
        """The text and logprobs `event` adds; sets `finish_reason` when the choice is over."""
        if event.finish_reason in ("error", "cancelled"):
            raise GenerationFailed(event.error or f"the generation was {event.finish_reason}")
        self.prompt_tokens = event.prompt_tokens or self.prompt_tokens
        self.cached_tokens = event.cached_tokens or self.cached_tokens
        delta = Delta()
        if event.token is not None:
            self.tokens += 1
            delta.text, stop = self.row.add(event.token)
            if self.wants_logprobs and event.token not in self.stop_ids and event.logprob is not None:
                top = [(int(t), _finite(lp)) for t, lp in event.top_logprobs or []]
                delta.logprobs.append(TokenLogprob(event.token, _finite(event.logprob), top))
            if stop is not None:
                return self._ended(delta, "stop")
        if event.finish_reason is not None:
            tail, stop = self.row.finish()
            delta.text += tail
            return self._ended(delta, "stop" if stop or event.finish_reason == "stop" else "length")
        return self._kept(delta)

    def _ended(self, delta: Delta, reason: str) -> Delta:
        self.finish_reason = reason
        return self._kept(delta)

    def _kept(self, delta: Delta) -> Delta:
        if delta.text:
            self.parts.append(delta.text)
        self.logprobs += delta.logprobs
        return delta
