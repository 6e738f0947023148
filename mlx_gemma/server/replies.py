"""A chat reply's structure, read as its text arrives: Gemma 4 thoughts, tool calls, content.

`Reply(thinking, fmt).feed(text)` and `.finish()` return events {"reasoning": str},
{"content": str} or {"tool_call": {index, id, type, function}}; the events of any split of a
reply add up to the same whole.  Two stages, in this order:

1. thoughts (only when the request turned Gemma 4's thinking on): each `<|channel>thought\\n ...
   <channel|>` is taken out of the text as reasoning, as mlx-lm's server (tokenizer_utils: a
   think start of `<|channel>thought`, an end of `<channel|>`) and vLLM's gemma4 reasoning parser
   split it.  The "thought\\n" header and the newline the chat template writes before `<channel|>`
   (chat_template.py's `_thought`) are dropped, so a client that sends the reasoning back gets
   the same prompt.  A thought the reply never closes (max_tokens) stays reasoning.
2. tool calls (only when tools were declared): what is left goes through
   `mlx_gemma.tool_calls.ToolCallStream` in the model's format.
"""

from __future__ import annotations

from ..tool_calls import ToolCallFormat, ToolCallStream

THOUGHT_START, THOUGHT_END = "<|channel>", "<channel|>"  # Gemma 4's channel tokens, as text
_HEADER = "thought\n"  # the channel's name line


class ThoughtSplit:
    """Splits `<|channel>thought\\n...\\n<channel|>` spans out of a text fed in pieces."""

    def __init__(self):
        self.buffer, self.inside, self.fresh = "", False, False  # fresh: a thought's header not yet read

    def feed(self, text: str) -> list[dict]:
        self.buffer += text
        events: list[dict] = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list[dict]) -> bool:
        """Consumes what it can of the buffer; True if it should be called again."""
        if not self.inside:
            at = self.buffer.find(THOUGHT_START)
            if at < 0:
                self._release(events, "content", (THOUGHT_START,))
                return False
            _add(events, "content", self.buffer[:at])
            self.buffer, self.inside, self.fresh = self.buffer[at + len(THOUGHT_START):], True, True
            return True
        if self.fresh:
            if len(self.buffer) < len(_HEADER) and _HEADER.startswith(self.buffer):
                return False  # the header may still be arriving
            self.buffer = self.buffer.removeprefix(_HEADER)
            self.fresh = False
        at = self.buffer.find(THOUGHT_END)
        if at < 0:  # hold back the newline before <channel|> and what could begin <channel|>
            self._release(events, "reasoning", ("\n" + THOUGHT_END, THOUGHT_END))
            return False
        thought = self.buffer[:at]
        _add(events, "reasoning", thought[:-1] if thought.endswith("\n") else thought)
        self.buffer, self.inside = self.buffer[at + len(THOUGHT_END):], False
        return True

    def _release(self, events: list[dict], kind: str, markers: tuple) -> None:
        """Sends the buffer but its longest end that could begin one of `markers`."""
        buf = self.buffer
        keep = max((k for m in markers for k in range(1, min(len(m) - 1, len(buf)) + 1) if m.startswith(buf[-k:])),
                   default=0)
        _add(events, kind, buf[:len(buf) - keep])
        self.buffer = buf[len(buf) - keep:]

    def finish(self) -> list[dict]:
        """What is held when the reply ends: an unclosed thought stays reasoning."""
        events: list[dict] = []
        if self.inside and self.fresh:  # a header cut short is still no thought text
            self.buffer = "" if _HEADER.startswith(self.buffer) else self.buffer.removeprefix(_HEADER)
        _add(events, "reasoning" if self.inside else "content", self.buffer)
        self.buffer, self.inside = "", False
        return events


class Reply:
    """A chat reply's events: thoughts split out when `thinking`, tool calls parsed when `fmt`."""

    def __init__(self, thinking: bool, fmt: ToolCallFormat | None):
        self.thoughts = ThoughtSplit() if thinking else None
        self.calls = ToolCallStream(fmt) if fmt is not None else None

    def feed(self, text: str) -> list[dict]:
        events = self.thoughts.feed(text) if self.thoughts else [{"content": text}] if text else []
        return self._parsed(events)

    def finish(self) -> list[dict]:
        out = self._parsed(self.thoughts.finish() if self.thoughts else [])
        return out + (self.calls.finish() if self.calls else [])

    def _parsed(self, events: list[dict]) -> list[dict]:
        if self.calls is None:
            return events
        out: list[dict] = []
        for event in events:
            out += self.calls.feed(event["content"]) if "content" in event else [event]
        return out


def _add(events: list[dict], kind: str, text: str) -> None:
    if text:
        events.append({kind: text})
