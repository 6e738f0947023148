"""The Gemma 4 assistant drafter as a speculative-decoding proposer (speculative.TargetReader).

A `gemma4_assistant` model (models/gemma4_assistant.py) has no KV cache and no token input of its own:
it drafts from the target's states.  Per round, as transformers 5.25's
`SinglePositionMultiTokenCandidateGenerator` drives `Gemma4AssistantForCausalLM`:

- t, the last token of the text (emitted by the target, not yet fed to it), at position p;
- the target's final normed hidden state at p - 1 (the row whose logits chose t: the prompt's last
  position after the prefill, or row n of a verify pass that kept n proposals);
- the keys and values of the target's last non-shared layer of each kind, read from its own caches
  (`target_sources`): every position the target holds, 0..p - 1, in time order;
- step i drafts from (the target's scaled embedding of the last token, the hidden state, those K/V,
  position p): the first step from (t, the target's hidden state), later ones from the token drafted
  and the `state` the drafter returned; every step's query sits at p.

Where we differ from transformers' generation loop (not from its model): after a rejection its loop
cuts the shared K/V to the new text length, which keeps one entry more than the target's cache holds
(the rejected proposal's, at p); we hand the drafter what the target holds.  Both agree after the
prefill and after a step that kept every proposal.  Sliding layers see the last `sliding_window` of
those positions (the drafter model's rule, keras-hub's).

Greedy targets get the drafter's argmax (q one-hot: None); sampling targets get draws from the
drafter's distribution shaped by the target's sampler filter, and that distribution as q, so the
rejection rule keeps the output the target's (transformers and keras-hub draft by argmax and still
use the softmax as q).  The draft logits are not soft-capped (transformers; keras-hub caps them).

It holds no cache of its own (`cache` is empty, `fed` 0), so a prompt cache keeps it as it is.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .errors import DistributedError, GenerationError
from .models import gemma4
from .models.gemma4_assistant import check_target, target_sources
from .models.kv_cache import RotatingKVCache, SharedKVCache, time_slice
from .samplers import greedy, log_softmax


def is_assistant(model) -> bool:
    """Whether `model` is a Gemma 4 assistant drafter (drafts from its target's states)."""
    return model.model_type == "gemma4_assistant"  # the model contract (models/__init__.py)


def attended(cache) -> tuple:
    """(keys, values) a store layer's `cache` holds, in time order up to its last position, as a query
    after them would see them: a ring's sinks and its last `visible` positions (older slack slots may
    hold positions a rollback forgot); a quantized cache's parts as they are."""
    if isinstance(cache, SharedKVCache):
        cache = cache.source
    if cache.keys is None:
        raise GenerationError("the target's KV cache is empty: the assistant drafts after the prompt's prefill")
    if not isinstance(cache, RotatingKVCache):
        parts = time_slice(cache.keys, None, cache.offset), time_slice(cache.values, None, cache.offset)
    else:
        parts = cache._in_time_order(cache.keys), cache._in_time_order(cache.values)
        held = min(cache.offset, cache.max_size)  # entries, the last at position offset - 1
        keep = min(cache.keep, held)
        recent = min(cache.visible, held - keep)
        if keep + recent < held:
            parts = tuple(_join(time_slice(p, None, keep), time_slice(p, held - recent, None)) for p in parts)
    return tuple(p[0] if len(p) == 1 else p for p in parts)


def _join(a: tuple, b: tuple) -> tuple:
    return tuple(mx.concatenate([x, y], axis=2) for x, y in zip(a, b))


def _as(kv, dtype):
    """Float keys/values (or a quantized cache's scales and biases) in the drafter's dtype."""
    if isinstance(kv, tuple):
        return (kv[0], *(x.astype(dtype) for x in kv[1:]))
    return kv.astype(dtype)


class AssistantDrafter:
    """Proposes k tokens per round with a Gemma 4 assistant drafter reading the target's states.

    `observe` (SpeculativeStep calls it after every target pass) keeps the target's hidden rows and
    caches; `accept(n)` picks row n; `propose` drafts.  Call `bind` before the first proposal.
    """

    def __init__(self, drafter):
        if not is_assistant(drafter):
            raise GenerationError(f"AssistantDrafter needs a gemma4_assistant model, got "
                                  f"{getattr(drafter, 'model_type', type(drafter).__name__)!r:.60}")
        self.model = drafter
        self.cache, self.fed = [], 0  # no caches of its own: they hold no tokens
        self.dtype = drafter.model.norm.weight.dtype  # its compute dtype (norms stay float when quantized)
        self.sampler, self.key = greedy, mx.random.key(0)
        self.target = self.stack = self.target_cache = self.rows = None
        self.sources: dict[str, int] = {}

    def bind(self, sampler, rows: int | None = None) -> AssistantDrafter:
        """Draw as the target's `sampler` shapes it (`rows`: the target's logits per position, unused:
        check_target has made the vocabularies equal)."""
        self.sampler = sampler or greedy
        self.key = mx.random.key(getattr(self.sampler, "seed", 0) + 1)
        self.target = self.target_cache = self.rows = None
        return self

    def observe(self, model, cache: Sequence, hidden: mx.array) -> None:
        """The target's pass just ran: its final normed hidden rows [T, D] and its caches."""
        if model is not self.target:
            if model.share is not None:  # every rank gets here after the same prefill: all refuse alike
                raise DistributedError(f"rank {model.share.rank}: a gemma4_assistant drafter reads its target's final "
                                       "hidden states and whole KV heads, which a pipeline or tensor-parallel rank "
                                       "does not hold; use a draft model (--draft-model) or --prompt-lookup")
            stack = model.decoder
            if not isinstance(stack, gemma4.Gemma4Stack):
                raise GenerationError(f"a gemma4_assistant drafter proposes for a Gemma 4 target, not "
                                      f"{model.model_type!r:.60}")
            check_target(self.model.args, stack.args, self.model.path)
            self.target, self.stack = model, stack
            self.sources = target_sources(stack.args)
        self.target_cache, self.rows = cache, hidden

    def accept(self, n: int) -> None:
        """The target kept n proposals: its hidden state at the n-th fed position starts the next round."""
        self.rows = self.rows[n : n + 1]

    def propose(self, history: list[int], k: int) -> tuple[mx.array, mx.array | None]:
        if self.rows is None:
            raise GenerationError("AssistantDrafter.propose before the target's first pass (observe)")
        position = self.target_cache[0].offset  # p: where the last token goes; the target holds 0..p - 1
        if position != len(history) - 1:
            raise GenerationError(f"the target's caches hold {position} tokens, but the text has {len(history)}: "
                                  "the assistant drafts for the token after the last one the target was fed")
        kv = {kind: tuple(_as(x, self.dtype) for x in attended(self.target_cache[i]))
              for kind, i in self.sources.items()}
        hidden = self.rows[-1:][None].astype(self.dtype)  # [1, 1, D]
        last = mx.array([[history[-1]]], mx.int32)
        tokens, qs = [], []
        for _ in range(k):
            logits, hidden = self.model(self.stack.embed(last).astype(self.dtype), hidden, kv, position)
            token, q = self._draw(logits[:, 0])
            tokens.append(token)
            qs.append(q)
            last = token[None]
        drafted = mx.concatenate(tokens) if tokens else mx.zeros((0,), mx.int32)
        return drafted, (None if not qs or qs[0] is None else mx.concatenate(qs, axis=0))

    def _draw(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """One token [1] from logits [1, V]: the argmax (greedy), or a draw from the filtered distribution."""
        if self.sampler is greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        q = self.sampler.filter(log_softmax(logits.astype(mx.float32)))
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(q, axis=-1, key=key).astype(mx.int32), q
