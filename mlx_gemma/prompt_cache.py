"""Prompt caches: one conversation's KV caches plus the token ids they hold.

A `PromptCache` lets later calls skip what earlier ones computed:
`stream_generate(model, tokenizer, prompt, prompt_cache=pc)` keeps the longest
common prefix of the new prompt and `pc.tokens`, feeds only the rest, and
leaves the cache holding prompt + generated tokens (a chat's next turn then
prefills only itself).  Going back to a shorter prefix trims the caches; a
sliding-window cache that has wrapped has dropped the tokens it would need,
so then everything is recomputed from scratch.

Speculative decoding (speculative.py) continues a prompt cache too: `make_room(k)` gives its
sliding windows k slots of slack (`RotatingKVCache`), laid out again in place when a window has
already wrapped, so each verify step can go back over rejected proposals; a draft model's own
caches stay paired with the prompt cache (`paired_draft`) and follow its tokens from turn to turn.

`save_prompt_cache` / `load_prompt_cache` store it as safetensors with our
own metadata (format marker, cache layout, the model's shape), checked on load.
"""

from __future__ import annotations

import json
import os

import mlx.core as mx

from .arguments import integer_arg, is_integer
from .engine import prefill
from .image_chat import image_digests, image_spans
from .models.batch_rows import with_slack
from .models.kv_cache import (KVCacheOptions, RotatingKVCache, SharedKVCache, cache_layout, make_layer_caches,
                              time_slice)
from .errors import GenerationError, MlxGemmaError, PromptCacheError
from .json_input import expect, field, number_in
from .models.config import LIMITS
from .proposers import DraftModel
from .speculative import roll_back
from .tensorfile import load_file_with_metadata, save_file

FORMAT = "mlx_gemma.prompt_cache"
VERSION = "1"


def model_fingerprint(model) -> dict:
    """What a cache must agree with to be used by `model` (and, for Gemma 4, which layers share
    their keys and values, and each layer's KV shape: `kv_cache.cache_layout`)."""
    a = model.args
    return {"model_type": a.model_type, "num_layers": len(model.windows), "windows": list(model.windows),
            "num_key_value_heads": a.num_key_value_heads, "head_dim": a.head_dim, "vocab_size": a.vocab_size,
            **cache_layout(model.make_cache()), **_share(model)}


def _share(model) -> dict:
    """A distributed rank's share (mlx_gemma.distributed), so its caches never pass for a whole model's:
    their KV heads (tensor) or layers (pipeline) are the rank's while `num_key_value_heads` and the
    layouts stay the whole model's.  Its caches live in memory only (save_prompt_cache refuses them)."""
    s = model.share
    return {} if s is None else {"share": {"strategy": s.strategy, "rank": s.rank, "size": s.size}}


class PromptCache:
    """The per-layer caches of one sequence (batch of one) and the ids they hold.

    `PromptCache(model, KVCacheOptions(...))` (or the options' fields as keywords:
    `PromptCache(model, max_kv_size=...)`) makes an empty one; the options are fixed from
    then on.
    `metadata` (str -> str) travels with it to and from files.  `slack`: extra ring slots of each
    sliding window, so speculative decoding can go back that many tokens after a wrap (0 unless
    speculation asks for it; `make_room` adds them to a cache already in use).
    """

    def __init__(self, model, options: KVCacheOptions | None = None, slack: int = 0, **kv_fields):
        self.fingerprint = model_fingerprint(model)
        self.options = KVCacheOptions.of(options, **kv_fields).check_head_dim(self.fingerprint["head_dim"])
        self.metadata: dict[str, str] = {}
        self.path: str | None = None  # the file it was loaded from
        self.slack = integer_arg("slack", slack, 0, error=GenerationError)
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new conversation)."""
        fp = self.fingerprint  # a KV-shared layer's entry holds nothing: its tokens are stored once
        self.caches = with_slack(make_layer_caches(fp["windows"], options=self.options,
                                                   shared_from=fp.get("kv_sources"), kv_shapes=fp.get("kv_shapes")),
                                 self.slack)
        self.tokens: list[int] = []
        self.images: list[tuple[int, int, str]] = []  # (start, end, digest) of each image block held
        self.draft: DraftModel | None = None  # speculative decoding's draft, its caches paired with these
        self.draft_tokens: list[int] = []  # what the draft's caches hold

    def make_room(self, slack: int) -> None:
        """Give every sliding window at least `slack` slots of slack (see `_widen`), keeping what it holds."""
        if slack > self.slack:
            for c in self.caches:
                if isinstance(c, RotatingKVCache):
                    _widen(c, slack)
            self.slack = slack

    def paired_draft(self, speculation, target_tokenizer, sampler, rows: int, ids: list[int]) -> DraftModel:
        """The draft proposer for a generation from `ids`, its caches trimmed to the longest prefix they
        share with `ids` (kept from the last generation that used this draft model), else a fresh one:
        the draft then prefills the whole conversation at its first proposal (as a loaded cache does,
        whose file holds no draft)."""
        model = speculation.draft_model[0] if isinstance(speculation.draft_model, tuple) else speculation.draft_model
        draft = self.draft
        if draft is not None and draft.model is model and _slack(draft.cache) >= speculation.num_draft_tokens:
            n = 0
            for held, new in zip(self.draft_tokens, ids):
                if held != new:
                    break
                n += 1
            n = min(n, len(ids))  # at least one new token: its hidden state starts the first proposal
            if n < draft.fed and not all(c.can_trim_to(n) for c in draft.cache if isinstance(c, RotatingKVCache)):
                draft = None  # a wrapped window cannot go back there
            elif n < draft.fed:
                roll_back(draft.cache, n)
                draft.fed = n
        else:
            draft = None
        if draft is None:
            draft = speculation.proposer(target_tokenizer, sampler, rows)
            if not isinstance(draft, DraftModel):  # a drafter with no caches of its own (Gemma 4's assistant)
                return draft
        self.draft = draft.bind(sampler, rows)
        self.draft_tokens = list(ids[: draft.fed])
        return draft

    @property
    def offset(self) -> int:
        return self.caches[0].offset

    def check(self, model) -> None:
        """PromptCacheError unless this cache was made for a model of `model`'s shape."""
        theirs = model_fingerprint(model)
        if "share" in theirs and self.fingerprint.get("share") != theirs["share"]:
            raise PromptCacheError(self.path, f"a prompt cache made in one process (or for another rank) does not fit "
                                              f"rank {model.share.rank} of a {model.share.strategy}-parallel model")
        diff = [f"{k} {self.fingerprint[k]!r} (the model has {theirs[k]!r})"
                for k in theirs if self.fingerprint.get(k) != theirs[k]]
        if diff:
            raise PromptCacheError(self.path, "the prompt cache was made for another model: " + "; ".join(diff))

    def prepare(self, ids: list[int], pixel_values: mx.array | None = None, image_token: int | None = None):
        """Keep the longest common prefix of the cached tokens and `ids`; returns the ids to feed.

        At least one id is always fed (its logits start the reply), so a prompt
        equal to the cached tokens recomputes its last one.  With `pixel_values` (one image per
        block of `image_token`s in `ids`, Gemma 3) returns (ids, pixel values) to feed: a cached
        image is kept only if its pixels are the same, the prefix never ends inside an image
        (its tokens attend to each other in one call), and only the images fed are returned.
        """
        blocks = None
        if image_token is not None:
            spans = image_spans(ids, image_token)
            digests = image_digests(pixel_values)
            if len(spans) != len(digests):
                raise GenerationError(f"the prompt holds {len(spans)} image(s), {len(digests)} were given")
            blocks = [(a, b, d) for (a, b), d in zip(spans, digests)]
        n = self._keep(ids, blocks)
        if image_token is None:
            return list(ids[n:])
        fed = [i for i, (a, _, _) in enumerate(blocks) if a >= n]
        return list(ids[n:]), (pixel_values[mx.array(fed)] if fed else None)

    def prepare_media(self, ids: list[int], media, image_input=None, audio_input=None):
        """As `prepare` for Gemma 4: `media` (a gemma4_prompts.Gemma4Media) holds one image per run of
        `image_input.token_id` and one clip per run of `audio_input.token_id` in `ids`; a cached image or
        clip is kept only if it is the same.  Returns (ids to feed, a Gemma4Media of the items fed)."""
        spans = [image_spans(ids, spec.token_id) if spec is not None else [] for spec in (image_input, audio_input)]
        counts = (len(media.image_tokens), len(media.audio_tokens))
        if any(len(s) != c and c for s, c in zip(spans, counts)):  # without media, the held ones must cover them
            raise GenerationError(f"the prompt holds {len(spans[0])} image(s) and {len(spans[1])} clip(s); "
                                  f"{counts[0]} and {counts[1]} were given")
        digests = iter(media.digests())
        blocks = [(a, b, next(digests)) for s, c in zip(spans, counts) if c for a, b in s]
        unnamed = [(a, b, None) for s, c in zip(spans, counts) if not c for a, b in s]  # only a held one may match
        held = {(a, b): d for a, b, d in self.images}
        blocks += [(a, b, held.get((a, b))) for a, b, _ in unnamed]
        if any(d is None for _, _, d in blocks):  # it would have to be fed, with nothing to feed
            raise GenerationError("the prompt holds media placeholders the cache does not hold and no media were given")
        n = self._keep(ids, sorted(blocks))
        fed = [[i for i, (a, _) in enumerate(s) if c and a >= n] for s, c in zip(spans, counts)]
        return list(ids[n:]), media.select(*fed)

    def _keep(self, ids: list[int], blocks: list[tuple[int, int, str]] | None) -> int:
        """Trim the caches to the longest prefix they share with `ids` (at most all but the last id)
        that ends outside every media block of `blocks` ((start, end, digest), None: no media
        tracked) and holds only blocks cached with the same digest; record it; return its length."""
        n = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            n += 1
        n = min(n, len(ids) - 1)
        if blocks is not None:
            held = set(self.images)
            n = min([n] + [a for a, b, d in blocks if a < n and ((a, b, d) not in held or b > n)])
        if n < self.offset and not all(c.trim_to(n) for c in self.caches):
            self.reset()  # a wrapped window cannot go back: start over
            n = 0
        self.tokens = list(ids[:n])
        # Those past n are fed now; without blocks, the cached ones in the prefix stay.
        self.images = list(blocks) if blocks is not None else [blk for blk in self.images if blk[1] <= n]
        return n

    def extend(self, model, ids: list[int], step_size: int | None = None) -> None:
        """Feed `ids` after what the cache holds, generating nothing (the cache_prompt flow).

        `step_size` positions per call; by default the device's, as generation's.
        """
        self.check(model)
        context = model.args.max_position_embeddings
        if len(self.tokens) + len(ids) >= context:
            raise GenerationError(f"{len(self.tokens) + len(ids)} tokens do not fit the model's context of {context}")
        if ids:
            prefill(model, mx.array([ids]), self.caches, step_size)
            mx.eval([c.state for c in self.caches])
        self.tokens += list(ids)

    def recorded(self, responses, ids: list[int]):
        """Pass `responses` (lists of one response) through, then set `tokens` to what the caches hold."""
        generated: list[int] = []
        try:
            for out in responses:
                generated.append(out[0].token)
                yield out
        finally:
            # The decode loop may have fed the last token already (it runs a step ahead); a speculative
            # step may have fed accepted proposals past where the caller stopped: those go back.
            full = list(ids) + generated
            if self.offset > len(full) and not all(c.trim_to(len(full)) for c in self.caches):
                self.reset()
            held = full[: self.offset]
            if len(held) != self.offset:  # cannot happen; never keep a cache that lies
                self.reset()
            else:
                self.tokens = held
                self.images = [blk for blk in self.images if blk[1] <= len(held)]
            self._follow_draft(full)

    def _follow_draft(self, full: list[int]) -> None:
        """Record what the paired draft's caches hold of `full` (prompt + tokens generated)."""
        if self.draft is None:
            return
        if self.draft.fed > len(full):
            if not all(c.trim_to(len(full)) for c in self.draft.cache):
                self.draft, self.draft_tokens = None, []
                return
            self.draft.fed = len(full)
        self.draft_tokens = full[: self.draft.fed]


def _slack(caches) -> int:
    """The least slack of the sliding windows in `caches` (a large number without one)."""
    return min((c.slack for c in caches if isinstance(c, RotatingKVCache)), default=1 << 30)


def _widen(c: RotatingKVCache, slack: int) -> None:
    """Make ring `c` `slack` slots longer than its window (in place: Gemma 4's shared layers point at it).

    A ring that has not wrapped is in time order and just grows.  A wrapped one is laid out again
    for the longer ring: its tokens in time order, with zeros for the positions it no longer holds
    (below `floor`: out of every later query's window, so masked, and never a rollback target).
    """
    extra = slack - c.slack
    wrapped = c.keys is not None and c.offset > c.max_size
    parts = (c._in_time_order(c.keys), c._in_time_order(c.values)) if wrapped else None
    old_ring = c.ring
    c.slack, c.max_size, c.ring = slack, c.max_size + extra, c.ring + extra
    if not wrapped:
        return
    missing = min(c.offset, c.max_size) - (c.max_size - extra)  # slots of the longer ring nothing holds
    laid = []
    for p in parts:  # sinks, zeros, the ring's tokens: time order, ending at offset
        laid.append(c._kept(tuple(mx.concatenate([a[..., :c.keep, :], mx.zeros(a.shape[:2] + (missing,) + a.shape[3:],
                                                                                a.dtype), a[..., c.keep:, :]], axis=2)
                                  for a in p)))
    c.keys, c.values = laid
    c.floor = max(c.floor, c.offset - old_ring)


def save_prompt_cache(path, cache: PromptCache, metadata: dict[str, str] | None = None) -> None:
    """Write `cache` (and `metadata`, str -> str, merged over its own) to the safetensors file `path`, atomically."""
    if not isinstance(cache, PromptCache):
        raise GenerationError(f"save_prompt_cache needs a PromptCache, got {type(cache).__name__}")
    if cache.images:
        raise GenerationError("a prompt cache holding images cannot be saved (the file format has no place for them)")
    if "share" in cache.fingerprint:
        raise GenerationError("a distributed rank's prompt cache cannot be saved: it holds the rank's share (its "
                              "layers or KV heads) of the model, and the file format describes a whole model")
    user = {**cache.metadata, **(metadata or {})}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user.items()):
        raise GenerationError("prompt cache metadata must map strings to strings")
    arrays = {"tokens": mx.array(cache.tokens, dtype=mx.int32)}
    layers = []
    for i, c in enumerate(cache.caches):
        if c.left_padding is not None or (c.keys is not None and c.keys[0].shape[0] != 1):
            raise GenerationError("only a single-sequence cache without padding can be saved")
        rotating = isinstance(c, RotatingKVCache)
        layers.append({"offset": c.offset, "quantized": c.quantized, "rotating": rotating,
                       **({"floor": c.floor} if rotating and c.floor else {})})
        if c.keys is None:
            continue
        filled = min(c.offset, c.max_size) if rotating else c.offset  # buffers grow ahead of their tokens
        stored = tuple(time_slice(parts, None, filled) for parts in (c.keys, c.values))
        for name, parts in zip(("keys", "values"), stored):
            for j, p in enumerate(parts):
                arrays[f"layers.{i}.{name}.{j}"] = p
    save_file(path, arrays, {
        "format": FORMAT, "version": VERSION, "options": json.dumps(cache.options.as_dict()),
        "model": json.dumps(cache.fingerprint), "layers": json.dumps(layers), "metadata": json.dumps(user),
        **({"slack": str(cache.slack)} if cache.slack else {})})  # rings stored with their slack slots


def load_prompt_cache(path, model=None) -> PromptCache:
    """Read a file written by `save_prompt_cache`; with `model`, also check that it fits it.

    Anything that is not such a file, or whose arrays do not match its own
    description, raises PromptCacheError (ModelFileError for unreadable files).
    """
    path = os.fspath(path)
    arrays, meta = load_file_with_metadata(path)
    if meta.get("format") != FORMAT:
        raise PromptCacheError(path, "not an mlx_gemma prompt cache (no format marker in its metadata)")
    if meta.get("version") != VERSION:
        raise PromptCacheError(path, f"prompt cache version {meta.get('version')!r:.40}; this mlx_gemma reads {VERSION!r}")
    fingerprint = _fingerprint(_metadata_json(meta, "model", dict, path), path)
    options, layers = _metadata_json(meta, "options", dict, path), _metadata_json(meta, "layers", list, path)
    user = _metadata_json(meta, "metadata", dict, path)
    unknown = sorted(options.keys() - _OPTION_KEYS)
    if unknown:
        raise PromptCacheError(path, f"metadata 'options' holds unknown cache options {unknown[:3]}")
    if len(layers) != len(fingerprint["windows"]):
        raise PromptCacheError(path, f"metadata 'layers' lists {len(layers)} layers, the model description "
                                     f"{len(fingerprint['windows'])}")
    for i, entry in enumerate(layers):
        key = f"layers[{i}]"
        expect(entry, dict, path, key, PromptCacheError)
        number_in(field(entry, "offset", int, path, error=PromptCacheError, where=key + "."), int, path,
                  key + ".offset", low=0, error=PromptCacheError)
        for flag in ("quantized", "rotating"):
            field(entry, flag, bool, path, error=PromptCacheError, where=key + ".")
        if "floor" in entry:
            number_in(entry["floor"], int, path, key + ".floor", low=0, high=entry["offset"], error=PromptCacheError)
    for k, v in user.items():
        expect(v, str, path, f"metadata.{k}", PromptCacheError)
    try:
        options = KVCacheOptions(**options).check_head_dim(fingerprint["head_dim"])
        pc = PromptCache.__new__(PromptCache)
        pc.fingerprint, pc.options, pc.metadata, pc.path = fingerprint, options, dict(user), path
        pc.slack = _slack_of(meta, path)
        pc.reset()  # no images: a cache holding images is never saved
        tokens = arrays.pop("tokens")
        if tokens.ndim != 1 or tokens.dtype != mx.int32:
            raise ValueError("'tokens' must be a 1-D int32 array")
        pc.tokens = tokens.tolist()
        if any(not 0 <= t < fingerprint["vocab_size"] for t in pc.tokens):
            raise ValueError("a token id is outside the model's vocabulary")
        for i, (c, entry) in enumerate(zip(pc.caches, layers)):
            _restore(c, i, entry, arrays, pc, len(pc.tokens))
        if arrays:
            raise ValueError(f"unexpected arrays {sorted(arrays)[:3]}")
    except KeyError as e:
        raise PromptCacheError(path, f"malformed prompt cache: no array {e}") from None
    except (ValueError, MlxGemmaError) as e:  # GenerationError from the cache options among them
        raise PromptCacheError(path, f"malformed prompt cache: {e}") from None
    if model is not None:
        pc.check(model)
    return pc


_OPTION_KEYS = set(KVCacheOptions().as_dict())


def _metadata_json(meta: dict, key: str, kind: type, path):
    """The JSON value stored as text under metadata `key`, of JSON kind `kind`."""
    if key not in meta:
        raise PromptCacheError(path, f"metadata has no {key!r}")
    try:
        value = json.loads(meta[key])
    except ValueError as e:  # JSONDecodeError, or an integer of more digits than Python converts
        raise PromptCacheError(path, f"metadata {key!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise PromptCacheError(path, f"metadata {key!r} is nested too deeply") from None
    return expect(value, kind, path, f"metadata {key}", PromptCacheError)


def _slack_of(meta: dict, path) -> int:
    """The rings' slack a file was saved with (none before speculation came to prompt caches)."""
    text = meta.get("slack", "0")
    if not text.isdigit() or len(text) > 6:
        raise PromptCacheError(path, f"metadata 'slack' must be a small integer >= 0, got {text!r:.40}")
    return int(text)


def _fingerprint(fp: dict, path) -> dict:
    """The model description of a cache file, each value typed and within a real model's bounds."""
    where = "model."
    expect(fp.get("model_type"), str, path, where + "model_type", PromptCacheError)
    for key, limit in (("num_key_value_heads", LIMITS["num_key_value_heads"]), ("head_dim", LIMITS["head_dim"]),
                       ("vocab_size", LIMITS["vocab_size"]), ("num_layers", LIMITS["num_hidden_layers"])):
        number_in(field(fp, key, int, path, error=PromptCacheError, where=where), int, path, where + key,
                  low=1, high=limit, error=PromptCacheError)
    windows = field(fp, "windows", list, path, error=PromptCacheError, where=where)
    if len(windows) != fp["num_layers"]:
        raise PromptCacheError(path, f"model.windows lists {len(windows)} layers, model.num_layers is {fp['num_layers']}")
    for i, w in enumerate(windows):
        if w is not None:
            number_in(w, int, path, f"{where}windows[{i}]", low=1, error=PromptCacheError)
    for key in ("kv_sources", "kv_shapes"):  # Gemma 4's layout (kv_cache.cache_layout), when present
        items = field(fp, key, list, path, error=PromptCacheError, where=where) if key in fp else []
        if key in fp and len(items) != fp["num_layers"]:
            raise PromptCacheError(path, f"{where}{key} lists {len(items)} layers, model.num_layers is {fp['num_layers']}")
        for j, item in enumerate(items):
            if key == "kv_sources" and item is not None:
                number_in(item, int, path, f"{where}{key}[{j}]", low=0, high=j - 1, error=PromptCacheError)
            elif key == "kv_shapes" and not (isinstance(item, list) and len(item) == 2 and all(
                    is_integer(v) and 0 < v <= LIMITS["head_dim"] for v in item)):
                raise PromptCacheError(path, f"{where}{key}[{j}] must be [KV heads, head dim], got {item!r:.60}")
    return fp


def _restore(c, i: int, entry: dict, arrays: dict, pc: PromptCache, n_tokens: int) -> None:
    """Fill layer i's cache `c` from `arrays` (popping what it uses), checking every shape."""
    if isinstance(c, SharedKVCache):  # stored nothing: its source's entry holds its keys and values
        if entry["offset"] != n_tokens or entry["quantized"] or entry["rotating"]:
            raise ValueError(f"layer {i} shares another layer's cache but the file describes a cache of its own")
        return
    if entry["rotating"] != isinstance(c, RotatingKVCache):
        raise ValueError(f"layer {i}: the cache kind does not match the model's window for it")
    if entry["offset"] != n_tokens:
        raise ValueError(f"layer {i} holds {entry['offset']} tokens but the file lists {n_tokens}")
    if entry["quantized"] and c.bits is None:
        raise ValueError(f"layer {i} is quantized but the options say kv_bits=None")
    stored = min(n_tokens, c.max_size) if entry["rotating"] else n_tokens
    H, D = c.kv_shape or (pc.fingerprint["num_key_value_heads"], pc.fingerprint["head_dim"])
    if entry["quantized"]:  # (uint32 packed values, scales, biases)
        groups = (1, H, stored, D // c.group_size)
        shapes = [(1, H, stored, D * c.bits // 32), groups, groups]
    else:
        shapes = [(1, H, stored, D)]
    parts = {}
    for name in ("keys", "values"):
        got = [arrays.pop(f"layers.{i}.{name}.{j}", None) for j in range(len(shapes))]
        if stored == 0 and all(a is None for a in got):
            continue
        if any(a is None or tuple(a.shape) != s for a, s in zip(got, shapes)):
            raise ValueError(f"layer {i} {name}: expected arrays of shapes {shapes}")
        if entry["quantized"] != (got[0].dtype == mx.uint32) or not all(
                mx.issubdtype(a.dtype, mx.floating) for a in got[int(entry["quantized"]):]):
            raise ValueError(f"layer {i} {name}: wrong dtypes")
        parts[name] = tuple(got)
    c.offset, c.quantized = n_tokens, bool(entry["quantized"])
    if entry["rotating"]:
        c.floor = entry.get("floor", 0)
    if parts:
        c.keys, c.values = parts["keys"], parts["values"]


# ----- the cache_prompt / generate --prompt-cache-file flow (as mlx-lm's) ---------------


def open_turn_ids(tokenizer, text: str, system: str | None = None) -> list[int]:
    """A chat opened on a user turn holding `text`, left unfinished: `<bos><start_of_turn>user\\n{text}`."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    return ids[: len(ids) - 1 - ids[::-1].index(tokenizer.end_of_turn_id)]  # up to the turn's end


def continuation_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """What follows cached ids: `text`, and in chat the end of the open user turn and the model's turn start."""
    ids = tokenizer.encode(text, add_bos=False)
    if chat:
        closing = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True)
        ids += closing[closing.index(tokenizer.end_of_turn_id):]  # <end_of_turn>\n<start_of_turn>model\n
    return ids

