"""Streaming decode: ids in one at a time, text out without ever splitting a UTF-8 character.

`GemmaTokenizer.detokenizer()` makes one; the segments it emits join to exactly
`decode(all_ids)`.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import GemmaTokenizer


class StreamingDetokenizer:
    """Ids in one at a time, text out in segments that never split a UTF-8 character.

    Text is decoded from a short window: the last committed run of ids that produced
    text (the "anchor") plus the ids pending since.  Decoding the anchor along with the
    new ids keeps SentencePiece from treating them as the start of the text (where it
    may drop a leading space), and subtracting the anchor's own text leaves exactly what
    the new ids add.  So each step costs a decode of a handful of ids, not the history.
    """

    def __init__(self, tokenizer: GemmaTokenizer, skip_special_tokens: bool = False):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.tokens: list[int] = []  # every id kept so far
        self._anchor: list[int] = []
        self._anchor_text = ""
        self._pending: list[int] = []
        self._parts: list[str] = []
        self._unread: list[str] = []

    def add_token(self, token_id: int) -> None:
        (token_id,) = self._tok._check_ids([token_id])
        if self._skip and token_id in self._tok.special_ids:
            return
        self.tokens.append(token_id)
        self._pending.append(token_id)
        if not self._ends_mid_character():
            self._commit()

    def finalize(self) -> None:
        """Flush held-back ids (an unfinished character decodes to U+FFFD, as `decode` does)."""
        self._commit()

    @property
    def last_segment(self) -> str:
        """Text added since the last read (reading clears it)."""
        text = "".join(self._unread)
        self._unread.clear()
        return text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def _ends_mid_character(self) -> bool:
        # Byte-fallback pieces (<0xE2> ...) are UTF-8 bytes; hold them back while they end
        # in a valid but unfinished sequence.  An invalid sequence can never complete, so it
        # is emitted (as U+FFFD, like `decode`) rather than held forever.
        tail = bytearray()
        for i in reversed(self._pending):
            if not self._tok._sp.is_byte(i):
                break
            tail.insert(0, int(self._tok._sp.id_to_piece(i)[3:5], 16))
        if not tail:
            return False
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decoder.decode(bytes(tail), final=False)
        return bool(decoder.getstate()[0])

    def _commit(self) -> None:
        if not self._pending:
            return
        sp = self._tok._sp
        window = self._anchor + self._pending
        decoded = sp.decode(window)
        if decoded.startswith(self._anchor_text):
            new = decoded[len(self._anchor_text):]
        else:  # never seen; stay exact by falling back to the whole history
            done = self.text
            decoded = window_text = sp.decode(self.tokens)
            new = window_text[len(done):] if window_text.startswith(done) else ""
            window = list(self.tokens)
        if new:
            self._parts.append(new)
            self._unread.append(new)
            # The next anchor must decode to non-empty text on its own (else SentencePiece
            # would again see "start of text"): the pending ids if they do, else the window.
            pending_text = sp.decode(self._pending)
            self._anchor, self._anchor_text = (self._pending, pending_text) if pending_text else (window, decoded)
        self._pending = []
