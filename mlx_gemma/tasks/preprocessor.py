"""`GemmaCausalLMPreprocessor`: strings <-> packed token ids, as keras-hub's.

Outputs equal keras-hub 0.32's (`CausalLMPreprocessor` with its `StartEndPacker`),
as numpy arrays: `token_ids` int32 and `padding_mask` bool, right-padded with
<pad>, [B, L] for a list of strings and [L] for one string.

* `__call__` (training): pack to L + 1 with <bos> / <eos> as configured, then
  x = first L, y = the next token, sample_weight = y's padding mask.
* `generate_preprocess`: <bos> always, no <eos> (generation continues the prompt).
* `generate_postprocess`: drop padding and <bos>/<eos>/<pad>, then detokenize.

Too-long inputs are cut at the end, before the start/end tokens are added.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ..arguments import integer_arg
from ..errors import MlxGemmaError
from .tokenizer import GemmaTokenizer


def as_texts(x) -> tuple[list[str], bool]:
    """(list of strings, whether the input was a batch)."""
    if isinstance(x, str):
        return [x], False
    if isinstance(x, np.ndarray) and x.ndim <= 1:
        x = x.tolist() if x.ndim else x.item()
        return as_texts(x)
    if isinstance(x, Sequence) and all(isinstance(t, str) for t in x):
        return list(x), True
    raise MlxGemmaError(f"the preprocessor takes a string or a list of strings, got {type(x).__name__}")


class GemmaCausalLMPreprocessor:
    def __init__(self, tokenizer, sequence_length: int = 1024, add_start_token: bool = True,
                 add_end_token: bool = True):
        self.tokenizer = tokenizer
        self.sequence_length = _length(sequence_length, "sequence_length")
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, sequence_length: int = 1024, **kwargs):
        return cls(GemmaTokenizer.from_preset(preset), sequence_length, **kwargs)

    def _pack(self, texts: list[str], length: int, add_start: bool, add_end: bool):
        tok = self.tokenizer
        start, end = [tok.start_token_id] if add_start else [], [tok.end_token_id] if add_end else []
        room = max(length - len(start) - len(end), 0)
        rows = [start + ids[:room] + end for ids in tok.tokenize(texts)]
        token_ids = np.full((len(rows), length), tok.pad_token_id, dtype=np.int32)
        padding_mask = np.zeros((len(rows), length), dtype=bool)
        for b, row in enumerate(rows):
            row = row[:length]  # only when length < the start + end tokens themselves
            token_ids[b, :len(row)] = row
            padding_mask[b, :len(row)] = True
        return token_ids, padding_mask

    def __call__(self, x, y=None, sample_weight=None, sequence_length: int | None = None):
        """Training inputs: (x={"token_ids", "padding_mask"}, y, sample_weight), y the next tokens."""
        if y is not None or sample_weight is not None:
            raise MlxGemmaError("the preprocessor makes y and sample_weight itself (next-token labels): pass only x")
        texts, batched = as_texts(x)
        length = _length(sequence_length or self.sequence_length, "sequence_length")
        ids, mask = self._pack(texts, length + 1, self.add_start_token, self.add_end_token)
        out = ({"token_ids": ids[:, :-1], "padding_mask": mask[:, :-1]}, ids[:, 1:], mask[:, 1:])
        return out if batched else ({k: v[0] for k, v in out[0].items()}, out[1][0], out[2][0])

    def generate_preprocess(self, x, sequence_length: int | None = None) -> dict:
        """Prompts for generation: <bos> + ids, right-padded to sequence_length (no <eos>)."""
        texts, batched = as_texts(x)
        length = _length(sequence_length or self.sequence_length, "sequence_length")
        ids, mask = self._pack(texts, length, True, False)  # keras-hub: start token always, never the end
        return {"token_ids": ids, "padding_mask": mask} if batched else {"token_ids": ids[0], "padding_mask": mask[0]}

    def generate_postprocess(self, x: dict) -> str | list[str]:
        """Text of generated {"token_ids", "padding_mask"} (prompt included, special tokens dropped)."""
        if not isinstance(x, dict) or "token_ids" not in x or "padding_mask" not in x:
            raise MlxGemmaError("generate_postprocess takes a dict with 'token_ids' and 'padding_mask'")
        ids = np.asarray(x["token_ids"]).astype(np.int64)
        keep = np.asarray(x["padding_mask"]).astype(bool)
        if ids.shape != keep.shape or ids.ndim not in (1, 2):
            raise MlxGemmaError(f"token_ids {ids.shape} and padding_mask {keep.shape} must be the same 1-D or 2-D shape")
        keep &= ~np.isin(ids, self.tokenizer.special_token_ids)
        # Gemma 3 pads its embedding past the tokenizer's pieces (262,208 rows for 262,144
        # pieces); those ids have no text, so an untrained model's picks of them are dropped.
        keep &= ids < self.tokenizer.vocabulary_size()
        if ids.ndim == 1:
            return self.tokenizer.detokenize(ids[keep].tolist())
        return [self.tokenizer.detokenize(row[k].tolist()) for row, k in zip(ids, keep)]


def _length(value, name: str) -> int:
    return integer_arg(name, value, 1)
