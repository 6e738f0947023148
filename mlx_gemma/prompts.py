"""Prompts in, text out: turning a prompt into token ids, and a row's tokens into released text.

`prompt_ids` accepts the three prompt forms (a string, token ids, chat messages);
`stop_settings` checks the stop ids and strings; `RowText` detokenizes one
sequence as it grows and stops on ids or on stop strings that may span tokens.
The decode loop in `generate.py` uses both; so do the chat and task front ends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .arguments import is_integer  # numpy ints are ids too
from .errors import GenerationError


def prompt_ids(tokenizer, prompt, chat: bool | None = None, system: str | None = None,
               vocab_size: int | None = None) -> list[int]:
    """The token ids of a prompt: a string (encoded with <bos>), token ids, or chat messages.

    `chat=None` renders messages with the chat template and leaves strings raw;
    `chat=True` also wraps a string as one user message (after `system`, if any).
    """
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        # A Sequence of ints to Python, but never token ids: raw text or a file's bytes.
        raise GenerationError(f"the prompt is {type(prompt).__name__}: decode it to a string first")
    if isinstance(prompt, str):
        if not prompt:
            raise GenerationError("the prompt is empty")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        else:
            if system:
                raise GenerationError("a system prompt needs the chat template (chat=True / --chat)")
            ids = tokenizer.encode(prompt, add_bos=True)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        if chat is False:
            raise GenerationError("chat messages need the chat template, but chat=False was asked for")
        messages = list(prompt)
        if system:
            if messages[0].get("role") == "system":
                raise GenerationError("system given twice: as an argument and as the first message")
            messages.insert(0, {"role": "system", "content": system})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        if hasattr(prompt, "tolist"):  # mx / numpy arrays
            prompt = prompt.tolist()
        if not isinstance(prompt, Sequence) or not all(is_integer(i) for i in prompt):
            raise GenerationError("the prompt must be a string, a list of token ids or a list of "
                                  f"{{'role', 'content'}} messages, got {type(prompt).__name__}")
        if prompt and (chat or system):
            raise GenerationError("token-id prompts are used as given: chat/system need text or messages")
        ids = [int(i) for i in prompt]
    if not ids:
        raise GenerationError("the prompt is empty")
    if vocab_size is not None:
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise GenerationError(f"prompt token id {bad} is outside the model's vocabulary (0..{vocab_size - 1})")
    return ids


def stop_settings(model, tokenizer, stop_strings, stop_token_ids) -> tuple[frozenset, tuple]:
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stop_strings = tuple(stop_strings or ())
    if not all(isinstance(s, str) and s for s in stop_strings):
        raise GenerationError(f"stop strings must be non-empty strings, got {list(stop_strings)!r}")
    if isinstance(stop_token_ids, int):
        stop_token_ids = [stop_token_ids]
    extra = list(stop_token_ids or ())
    V = model.args.vocab_size
    bad = next((i for i in extra if not is_integer(i) or not 0 <= i < V), None)
    if bad is not None:
        raise GenerationError(f"stop token id {bad!r} is not an id in the model's vocabulary (0..{V - 1})")
    return frozenset(tokenizer.eos_token_ids) | frozenset(int(i) for i in extra), stop_strings


class RowText:
    """One row's text: detokenize, stop on ids and strings, hold back possible stop-string starts.

    Text that could be the beginning of a stop string is not released until the
    next tokens show it is not; a stop string itself is never released.
    """

    def __init__(self, tokenizer, stop_ids, stop_strings, skip_special_tokens):
        self.detokenizer = tokenizer.detokenizer(skip_special_tokens)
        self.tokenizer_size = tokenizer.vocab_size
        self.stop_ids, self.stop_strings = stop_ids, stop_strings
        self.held = ""

    def add(self, token: int) -> tuple[str, str | None]:
        """(text to release, "stop" or None) after `token`."""
        if token in self.stop_ids:
            return self.finish()[0], "stop"
        # Models may have more embedding rows than the tokenizer has pieces (Gemma 3 pads
        # 262,144 to 262,208); such an id has no text.
        if token < self.tokenizer_size:
            self.detokenizer.add_token(token)
        return self._release(self.detokenizer.last_segment, final=False)

    def finish(self) -> tuple[str, str | None]:
        """Everything still held (generation ends), unless it completes a stop string."""
        self.detokenizer.finalize()
        return self._release(self.detokenizer.last_segment, final=True)

    def _release(self, segment: str, final: bool) -> tuple[str, str | None]:
        self.held += segment
        if not self.stop_strings:
            out, self.held = self.held, ""
            return out, None
        found = [i for i in (self.held.find(s) for s in self.stop_strings) if i >= 0]
        if found:
            out, self.held = self.held[:min(found)], ""
            return out, "stop"
        # Hold back the longest end of the text that begins some stop string.
        keep = 0 if final else max((k for s in self.stop_strings for k in range(1, min(len(s), len(self.held) + 1))
                                    if self.held.endswith(s[:k])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, None
