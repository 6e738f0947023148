"""Proposers for speculative decoding (speculative.py): where the tokens the target checks come from.

- `PromptLookup(n)`: the tokens that followed the latest earlier occurrence of the text's last
  n tokens (then n - 1, ..., `min_n`) in the prompt and the text so far.  No second model; it
  pays where the answer quotes its input (summaries, code edits, RAG answers).
- `DraftModel(model, tokenizer)`: a smaller Gemma with the target's vocabulary drafts token by
  token with KV caches of its own, rolled back with the target's.
- `AssistantDrafter(drafter)` (assistant_proposer.py): a Gemma 4 `gemma4_assistant` drafter, reading
  the target's hidden states and KV caches; `Speculation` picks it for such a `draft_model`.

All follow `speculative.Proposer`: `propose(history, k) -> (tokens [n], q log-probabilities
[n, V] or None)` and `accept(n)`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from .arguments import integer_arg
from .assistant_proposer import AssistantDrafter, is_assistant
from .engine import prefill
from .loading import load
from .models.batch_rows import with_slack
from .errors import GenerationError
from .samplers import greedy, log_softmax
from .speculative import can_roll_back, roll_back
from .tokenizer import GemmaTokenizer


class PromptLookup:
    """n-gram lookup: deterministic, so q is one-hot (None).

    An index from each n-gram (n in [min_n, max_n]) to where the tokens after its latest
    occurrence start grows with the text, so a proposal costs O(max_n), not a scan.
    """

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if isinstance(max_n, bool) or not isinstance(max_n, int) or not 1 <= min_n <= max_n:
            raise GenerationError(f"prompt_lookup must be an n-gram length >= {min_n}, got {max_n!r}")
        self.max_n, self.min_n = max_n, min_n
        self._index: dict[tuple, int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index

    def _grow(self, history: list[int]) -> None:
        # The n-grams ending at the last token are left out: their continuation is not known yet.
        for end in range(max(self._indexed, 1), len(history)):
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._index[tuple(history[end - n : end])] = end
        self._indexed = max(self._indexed, len(history))

    def propose(self, history: list[int], k: int) -> tuple[mx.array, None]:
        if len(history) < self._indexed:  # a new text: start over
            self._index, self._indexed = {}, 0
        self._grow(history)
        self._indexed = len(history)
        for n in range(min(self.max_n, len(history)), self.min_n - 1, -1):
            start = self._index.get(tuple(history[-n:]))
            if start is not None:
                return mx.array(history[start : start + k], mx.int32), None
        return mx.zeros((0,), mx.int32), None

    def accept(self, n: int) -> None:
        """Nothing to roll back."""


def same_vocabulary(target: GemmaTokenizer, draft: GemmaTokenizer) -> None:
    """A typed error unless the two tokenizers have the same pieces, id for id.

    Embedding row counts cannot tell (Gemma 3 270M / 1B have 262,144 rows, 4B-27B 262,208,
    with the same tokenizer), so the SentencePiece pieces are compared.
    """
    a, b = target.get_vocabulary(), draft.get_vocabulary()
    if a != b:
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise GenerationError(f"the draft model's tokenizer differs from the target's ({len(b)} vs {len(a)} pieces; "
                              f"first difference at id {first}): a draft must share the target's vocabulary")


class DraftModel:
    """A draft Gemma proposing k tokens one at a time, from its own KV caches.

    Greedy targets get the draft's argmax (q None: one-hot); sampling targets get draws from the
    draft's distribution shaped by the target's sampler filter (temperature, top-k/p, min-p),
    with q returned over the target's `rows` ids (larger draft heads cut; smaller ones padded
    with impossible ids).  Call `bind` before the first proposal.
    """

    def __init__(self, model, tokenizer: GemmaTokenizer | None = None, target_tokenizer: GemmaTokenizer | None = None,
                 kv_options=None, slack: int = 3):
        self.model = model
        if target_tokenizer is not None:
            draft_tokenizer = tokenizer if tokenizer is not None else GemmaTokenizer.from_folder(model.path)
            same_vocabulary(target_tokenizer, draft_tokenizer)
        # Sliding windows keep `slack` more slots (the most drafts per step), to go back after wrapping.
        self.cache = with_slack(model.make_cache(None, kv_options), slack)
        self.fed = 0  # tokens of the history the draft's caches hold
        self.sampler, self.rows, self.key = greedy, None, mx.random.key(0)
        self._base, self._ahead = 0, 0

    def bind(self, sampler, rows: int) -> DraftModel:
        """Draw as the target's `sampler` shapes it, over the target's `rows` logits."""
        self.sampler, self.rows = sampler or greedy, rows
        self.key = mx.random.key(getattr(self.sampler, "seed", 0) + 1)
        return self

    def _shaped(self, logits: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        V = self.rows or logits.shape[-1]
        if logits.shape[-1] > V:
            logits = logits[..., :V]
        elif logits.shape[-1] < V:
            logits = mx.pad(logits, [(0, 0), (0, V - logits.shape[-1])], constant_values=-float("inf"))
        return log_softmax(logits)

    def _draw(self, hidden: mx.array) -> tuple[mx.array, mx.array | None]:
        logprobs = self._shaped(self.model.logits(hidden[:, -1, :]))  # [1, V]
        if self.sampler is greedy:
            return mx.argmax(logprobs, axis=-1).astype(mx.int32), None
        q = self.sampler.filter(logprobs)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(q, axis=-1, key=key).astype(mx.int32), q

    def propose(self, history: list[int], k: int) -> tuple[mx.array, mx.array | None]:
        new = len(history) - self.fed  # tokens the caches have not seen: the prompt, or the last 1-2
        while k > 1 and not can_roll_back(self.cache, new + k - 1, k - 1):
            k -= 1  # a wrapped window without room to go back: draft fewer
        hidden = prefill(self.model, mx.array([history[self.fed :]], mx.int32), self.cache)
        tokens, qs = [], []
        for i in range(k):
            token, q = self._draw(hidden)
            tokens.append(token)
            qs.append(q)
            if i < k - 1:  # the last draft is never fed: the target checks it
                hidden = self.model.model(token[None], cache=self.cache)
        self._base, self._ahead = len(history), k - 1
        self.fed = len(history) + k - 1
        drafted = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.int32)
        return drafted, (None if not qs or qs[0] is None else mx.concatenate(qs, axis=0))

    def step_seconds(self) -> float:
        """Seconds one draft step takes alone (one token, head included, on a throwaway cache: a lower
        bound), the faster of two; `Adaptive` weighs it before this draft reads the prompt."""
        best = float("inf")
        for _ in range(2):
            tic = time.perf_counter()
            hidden = self.model.model(mx.array([[0]], mx.int32), cache=self.model.make_cache())
            mx.eval(self.model.logits(hidden[:, -1]))
            best = min(best, time.perf_counter() - tic)
        return best

    def accept(self, n: int) -> None:
        """Keep the n accepted drafts the caches hold (at most the k - 1 fed)."""
        keep = self._base + min(n, self._ahead)
        if keep < self.fed:
            roll_back(self.cache, keep)
            self.fed = keep


@dataclass(frozen=True)
class Speculation:
    """How a generation call speculates: a draft model or prompt lookup, k tokens at most per step."""

    draft_model: Any = None  # a model, (model, tokenizer) as `load` returns them, or a folder / hub id to load
    prompt_lookup: int | None = None  # the longest n-gram prompt lookup matches
    num_draft_tokens: int = 3  # most tokens proposed per step (mlx-lm's default)

    @classmethod
    def of(cls, draft_model=None, num_draft_tokens: int | None = None, prompt_lookup: int | None = None):
        """The settings, checked; None when neither proposer is asked for."""
        if draft_model is None and prompt_lookup is None:
            if num_draft_tokens is not None:
                raise GenerationError("num_draft_tokens needs draft_model or prompt_lookup")
            return None
        if draft_model is not None and prompt_lookup is not None:
            raise GenerationError("give draft_model or prompt_lookup, not both")
        k = 3 if num_draft_tokens is None else num_draft_tokens
        integer_arg("num_draft_tokens", k, 1, error=GenerationError)
        if isinstance(draft_model, (str, os.PathLike)):  # a folder or hub id, as the CLI's --draft-model
            draft_model = load(draft_model)
        if prompt_lookup is not None:
            integer_arg("prompt_lookup", prompt_lookup, 1, error=GenerationError)
        return cls(draft_model, prompt_lookup, k)

    def proposer(self, target_tokenizer: GemmaTokenizer, sampler, rows: int):
        """A fresh proposer for one generation (`rows`: the target's logits per position)."""
        if self.prompt_lookup is not None:
            return PromptLookup(self.prompt_lookup)
        model, tokenizer = self.draft_model if isinstance(self.draft_model, tuple) else (self.draft_model, None)
        if is_assistant(model):  # drafts from the target's states, in the target's vocabulary (check_target)
            return AssistantDrafter(model).bind(sampler, rows)
        return DraftModel(model, tokenizer, target_tokenizer, slack=self.num_draft_tokens).bind(sampler, rows)
