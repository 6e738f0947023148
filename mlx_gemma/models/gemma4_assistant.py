"""Gemma 4 assistant drafter (`gemma4_assistant`): proposes tokens for a Gemma 4 target to verify.

As transformers 5.25's `Gemma4AssistantForCausalLM` defines it (keras-hub 0.32's
`Gemma4AssistantCausalLM` is the same network).  A drafter has no token embedding input and no
KV cache of its own: every one of its blocks is a KV-shared Gemma 4 block (gemma4.DecoderLayer)
attending with the keys and values of the target's last non-shared layer of the same kind.  It
reads the target's states and drafts one token per call; it never runs alone.

The contract (what a speculative policy hands in, per draft step; B rows, one query each):
- `embedding` [B, 1, H]: the target's scaled input embedding of the last token (gemma4.Gemma4Stack
  `.embed(ids)`: the embedding row times sqrt(H) rounded to the dtype), H = the target's hidden size
  (`backbone_hidden_size`).  The first step of a round: the last token of the text; later steps: the
  token this drafter proposed at the step before.
- `hidden` [B, 1, H]: the first step of a round: a final *normed* hidden state of the target
  (transformers' `hidden_states[-1]`, what the target's head reads); later steps: the `state` this
  drafter returned at the step before (its `post_projection`, H wide).
- `kv`: {"sliding_attention" / "full_attention": (keys, values)}, each [B, kv_heads, S, head_dim]
  in time order (or a quantized KV cache's `mx.quantize` parts of them), the keys after k_norm and
  RoPE, the values after v_norm, as the target attended with them: those of the target's *last
  non-shared layer of that kind* (`target_sources`), for positions up to `position` at most, the last
  entry the latest position.  A sliding kind may hold only the last positions (a rotating cache's
  window, in time order).  They stay the same for every step of a round.
- `position` (int): the drafter's query position, the same at every step of a round (the same RoPE).
- `padding_mask` (bool [B, position + 1], optional): False at left padding; each kind's K/V are
  aligned with its last entries.
Returns `(logits [B, 1, vocab], state [B, 1, H])`.  The state between the steps of a round is the
drafted token and `state`; nothing else is carried.

How the references start a round differs.  transformers' generation loop
(`SinglePositionMultiTokenCandidateGenerator`, which assistant_proposer.py follows): the last token t
at position p (emitted by the target, not yet fed to it), the target's hidden state at p - 1 (whose
logits chose t), `position` p, the K/V of positions 0..p - 1.  keras-hub's first round after the
prefill: the last prompt token and the hidden state at its own position, `position` and K/V up to it;
its later rounds as transformers', though its mask also shows its cache's slot at p (what the last
verify pass wrote there: a rejected proposal's K/V).

Where the references differ (we follow keras-hub, Google's code, and say so):
- sliding layers see the last `sliding_window` entries of the K/V handed in (keras-hub masks as the
  target's own query at `position`; transformers' bidirectional sliding mask, `|q - k| <= window`,
  shows one more).  Both agree while the K/V hold at most `sliding_window` positions.
- keras-hub caps the draft logits with the *target's* `final_logit_softcapping`, transformers does
  not: `logit_cap` (default None, transformers).  Greedy drafts are the same either way.

The centroid-masked head (`use_ordered_embeddings`, E2B / E4B drafters): `num_centroids` clusters
of `vocab / num_centroids` token ids each (`token_ordering`, saved with the weights); the top
`centroid_intermediate_top_k` clusters by `centroids(h)` give their tokens a logit against the tied
embedding; every other token gets the smallest kept logit (over the whole batch) minus 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ..arguments import is_integer
from ..errors import ConfigError, GenerationError
from . import gemma4
from .config import parse_config
from .layers import softcap

FULL, SLIDING = gemma4.FULL, gemma4.SLIDING
# What transformers' Gemma4AssistantConfig.validate_architecture requires of the drafter's text stack.
_TEXT_REQUIRED = {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0, "enable_moe_block": False,
                  "use_double_wide_mlp": False}


@dataclass
class ModelArgs:
    text_config: dict[str, Any] = field(default_factory=dict)  # the drafter's own Gemma 4 text stack (gemma4_text keys)
    backbone_hidden_size: int = 1536  # the target's hidden size: its embeddings and hidden states come this wide
    use_ordered_embeddings: bool = False  # the centroid-masked head (E2B / E4B drafters); False: the plain tied head
    num_centroids: int = 2048  # token clusters of the masked head; the vocabulary splits into equal ones
    centroid_intermediate_top_k: int = 32  # clusters whose tokens get a logit at each step
    tie_word_embeddings: bool = True  # the head is the drafter's embedding table (no lm_head weight)
    model_type: str = "gemma4_assistant"  # as config.json names the architecture
    extra: dict[str, Any] = field(default_factory=dict)  # keys we keep but do not interpret

    @classmethod
    def from_dict(cls, config: dict, path=None, where: str = "") -> "ModelArgs":
        if not isinstance(config, dict) or not isinstance(config.get("text_config"), dict):
            raise ConfigError(path, "a gemma4_assistant config needs a text_config object")
        args = parse_config(cls, config, path, where)
        # Set after construction, not a dataclass field: parse_config must never fill it.
        args.text = _text_args(args.text_config, path, where + "text_config.")
        args.check(path, where)
        return args

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    def check(self, path, where: str = "") -> None:
        """Refuse sizes the head or the projections could not use, naming the field."""
        if not is_integer(self.backbone_hidden_size) or not 0 < self.backbone_hidden_size <= 1 << 16:
            raise ConfigError(path, f"{where}backbone_hidden_size must be a positive integer, "
                                    f"got {self.backbone_hidden_size!r:.40}")
        if not self.use_ordered_embeddings:
            return
        if not self.tie_word_embeddings:  # our masked head gathers the embedding's rows (float or quantized)
            raise ConfigError(path, f"{where}use_ordered_embeddings with tie_word_embeddings false is not supported")
        c, k = self.num_centroids, self.centroid_intermediate_top_k
        if not is_integer(c) or not 0 < c <= self.vocab_size or self.vocab_size % c:
            raise ConfigError(path, f"{where}num_centroids must divide vocab_size ({self.vocab_size}), got {c!r:.40}")
        if not is_integer(k) or not 0 < k <= c:
            raise ConfigError(path, f"{where}centroid_intermediate_top_k must be in [1, num_centroids], got {k!r:.40}")


@dataclass
class _DrafterTextArgs(gemma4.ModelArgs):
    """gemma4.ModelArgs for a stack whose every layer reads another model's K/V."""

    def kv_sources(self) -> list[int | None]:
        return [-1] * self.num_hidden_layers  # -1: the target (gemma4.Attention only asks "shared?")


def _text_args(text: dict, path, where: str) -> _DrafterTextArgs:
    """The drafter's stack settings, checked as transformers checks them; gemma4's parser runs them
    as an unshared stack (it knows no stack that shares every layer), then every layer is shared."""
    for key, value in _TEXT_REQUIRED.items():
        if key in text and text[key] not in (value, None):
            raise ConfigError(path, f"{where}{key} must be {value!r} in a drafter, got {text[key]!r:.40}")
    layers = text.get("num_hidden_layers")
    shared = text.get("num_kv_shared_layers") or layers  # 0 / absent: all (Gemma4AssistantConfig.__post_init__)
    if shared != layers:
        raise ConfigError(path, f"{where}num_kv_shared_layers must equal num_hidden_layers ({layers!r:.20}): "
                                f"every drafter layer reads the target's K/V, got {shared!r:.20}")
    own = {k: v for k, v in text.items() if k not in _TEXT_REQUIRED}
    args = _DrafterTextArgs.from_dict({**own, "model_type": "gemma4_text", "num_kv_shared_layers": 0,
                                       "hidden_size_per_layer_input": 0}, path, where)
    args.num_kv_shared_layers, args.vocab_size_per_layer_input = args.num_hidden_layers, 0  # as the file says
    return args


def target_sources(target) -> dict[str, int]:
    """Layer kind -> index of the target layer whose K/V the drafter reads: the last non-shared layer
    of that kind (transformers' kv_sharing_modes "store"; keras-hub's target_kv_source_*_idx).
    `target` is a gemma4.ModelArgs."""
    return {kind: i for i, kind in enumerate(target.layer_types[: target.first_shared])}


def check_target(args: ModelArgs, target, path=None) -> None:
    """ConfigError (naming the drafter's `path`) unless this drafter fits the gemma4 target `target`
    (a gemma4.ModelArgs): its hidden size, vocabulary, and the K/V shape of each layer kind it reads."""
    if target.hidden_size != args.backbone_hidden_size:
        raise ConfigError(path, f"backbone_hidden_size {args.backbone_hidden_size} does not match the target's "
                                f"hidden_size {target.hidden_size}")
    if target.vocab_size != args.vocab_size:
        raise ConfigError(path, f"text_config.vocab_size {args.vocab_size} does not match the target's "
                                f"vocab_size {target.vocab_size}")
    sources = target_sources(target)
    for i, kind in enumerate(args.text.layer_types):
        if kind not in sources:
            raise ConfigError(path, f"text_config.layer_types[{i}] {kind!r}: the target has no such layer to read")
        want, have = args.text.layer_shape(i), target.layer_shape(sources[kind])
        if want != have:
            raise ConfigError(path, f"text_config layer {i} ({kind}) attends with {want[0]} KV heads of width "
                                    f"{want[1]}; the target's layer {sources[kind]} has {have[0]} of width {have[1]}")


class MaskedHead(nn.Module):
    """The centroid-masked output head: logits only for the tokens of the top-k centroids."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids
        self.centroids = nn.Linear(args.hidden_size, args.num_centroids, bias=False)
        self.token_ordering = mx.zeros((args.vocab_size,), dtype=mx.int32)  # cluster c holds ids [c*n, (c+1)*n)

    def allowed(self, h: mx.array) -> mx.array:
        """[B, T, top_k * n]: the token ids the head gives a logit for hidden states h [B, T, hidden]."""
        scores = self.centroids(h)  # [B, T, num_centroids]
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]  # a set: order is moot
        clusters = self.token_ordering.reshape(self.num_centroids, -1)  # [num_centroids, n]
        return clusters[top].reshape(*h.shape[:-1], -1)

    def __call__(self, h: mx.array, table: nn.Module, vocab: int) -> mx.array:
        """Logits [B, T, vocab]: `table`'s rows (the tied embedding, float or quantized) at the allowed
        ids against h; the rest the smallest of those minus 1 (transformers' Gemma4AssistantMaskedEmbedder)."""
        ids = self.allowed(h)  # [B, T, n_kept]
        rows = table(ids)  # [B, T, n_kept, hidden]: unscaled rows, as the head uses them
        kept = (rows @ h[..., None])[..., 0]  # [B, T, n_kept]
        fill = kept.min() - 1.0  # one value over the whole batch, as both references take it
        out = mx.full((*h.shape[:-1], vocab), fill, dtype=kept.dtype)
        return mx.put_along_axis(out, ids, kept, axis=-1)


class DrafterStack(nn.Module):
    """The drafter's blocks: pre-projected inputs [B, 1, hidden] -> normed hidden [B, 1, hidden].
    `embed_tokens` serves only as the tied output head."""

    def __init__(self, args: _DrafterTextArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [gemma4.DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = gemma4.RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, h: mx.array, kv: dict, position: int, padding_mask: mx.array | None) -> mx.array:
        masks = {kind: _mask(_length(kv[kind][0]), layer.window, padding_mask)
                 for kind, layer in zip(self.args.layer_types, self.layers)}
        for kind, layer in zip(self.args.layer_types, self.layers):
            h, _ = layer(h, masks[kind], None, position, None, kv[kind])
        return self.norm(h)


def _length(keys) -> int:
    """Positions held by keys [B, heads, S, D], or by a quantized KV cache's (w_q, scales, biases) of them."""
    return (keys[0] if isinstance(keys, (tuple, list)) else keys).shape[2]


def _mask(length: int, window: int | None, padding_mask: mx.array | None) -> mx.array | None:
    """bool [B|1, 1, 1, S] for a query at the last of `length` key positions: the real ones, and on a
    sliding layer only the last `window` (keras-hub's Gemma4 sliding mask at `cache_update_index`)."""
    valid = None
    if padding_mask is not None:
        valid = padding_mask[:, -length:].astype(mx.bool_)  # [B, S]: each kind's K/V end at the last position
    if window is not None and length > window:
        recent = mx.arange(length) >= length - window  # [S]
        valid = recent[None] if valid is None else valid & recent
    return None if valid is None else valid[:, None, None, :]


class Model(nn.Module):
    """Gemma 4 assistant drafter: (target embedding, hidden state, K/V, position) -> (logits, state)."""

    image_input = None  # no towers: `convert` writes it as it is
    audio_input = None
    float_prefixes = ()  # every linear layer and the embedding may be quantized (token_ordering is no layer)
    prefix_lm = False

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type: str = args.model_type
        self.path = None  # set by `loading.load_model` to the folder it read
        self.model = DrafterStack(args.text)
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, args.hidden_size, bias=False)
        self.post_projection = nn.Linear(args.hidden_size, args.backbone_hidden_size, bias=False)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedHead(args)

    @property
    def layers(self) -> list:
        return self.model.layers

    def __call__(self, embedding: mx.array, hidden: mx.array, kv: dict, position: int,
                 padding_mask: mx.array | None = None, logit_cap: float | None = None) -> tuple[mx.array, mx.array]:
        """One draft step (the contract in the module docstring): logits [B, 1, vocab], state [B, 1, H]."""
        self._check_inputs(embedding, hidden, kv, position, padding_mask)
        x = self.pre_projection(mx.concatenate([embedding, hidden.astype(embedding.dtype)], axis=-1))
        h = self.model(x, kv, position, padding_mask)  # [B, 1, hidden]
        return softcap(self.head(h), logit_cap), self.post_projection(h)

    def head(self, h: mx.array) -> mx.array:
        """Logits [B, T, vocab] for the drafter's normed hidden states (no soft-cap: transformers has none)."""
        table = self.model.embed_tokens
        if self.args.use_ordered_embeddings:  # tied (ModelArgs.check): the rows it gathers are the head's
            return self.masked_embedding(h, table, self.args.vocab_size)
        return table.as_linear(h) if self.args.tie_word_embeddings else self.lm_head(h)

    def _check_inputs(self, embedding, hidden, kv, position, padding_mask) -> None:
        """GenerationError naming what a caller handed in wrongly (shapes against this drafter's config)."""
        width = self.args.backbone_hidden_size
        for name, x in (("embedding", embedding), ("hidden", hidden)):
            if x.ndim != 3 or x.shape[1] != 1 or x.shape[2] != width:
                raise GenerationError(f"{name} must be [B, 1, {width}] (one query, the target's width), "
                                      f"got {tuple(x.shape)}")
        if not is_integer(position) or position < 0:
            raise GenerationError(f"position must be a non-negative integer, got {position!r:.40}")
        for i, kind in enumerate(self.args.text.layer_types):
            if kind not in kv:
                raise GenerationError(f"kv has no {kind!r} keys/values, which drafter layer {i} reads")
            keys, values = kv[kind]
            heads, dim = self.args.text.layer_shape(i)
            B = embedding.shape[0]
            if isinstance(keys, (tuple, list)):  # a quantized cache's parts: models.layers.attention takes them
                k0, v0 = keys[0], values[0] if isinstance(values, (tuple, list)) else values
                if len(keys) != 3 or k0.shape != v0.shape or k0.ndim != 4 or k0.shape[:2] != (B, heads):
                    raise GenerationError(f"kv[{kind!r}] must be quantized [{B}, {heads}, S, ...] keys and values "
                                          "as mx.quantize gives them")
                S = k0.shape[2]
            else:
                S = keys.shape[2] if keys.ndim == 4 else -1
                if keys.shape != values.shape or keys.ndim != 4 or keys.shape[:2] != (B, heads) or keys.shape[3] != dim:
                    raise GenerationError(f"kv[{kind!r}] must be [{B}, {heads}, S, {dim}] keys and values, "
                                          f"got {tuple(keys.shape)} / {tuple(values.shape)}")
            if S > position + 1:
                raise GenerationError(f"kv[{kind!r}] holds {S} positions, more than 0..{position}: cut it at position")
        if padding_mask is not None and tuple(padding_mask.shape) != (embedding.shape[0], position + 1):
            raise GenerationError(f"padding_mask must be [B, position + 1] = [{embedding.shape[0]}, {position + 1}], "
                                  f"got {tuple(padding_mask.shape)}")

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Our names from a transformers `Gemma4AssistantForCausalLM` checkpoint (they are its names):
        the tied head dropped, K/V weights of its shared layers dropped (transformers ignores them too),
        RoPE buffers dropped, `token_ordering` as int32."""
        out = {}
        for name, w in weights.items():
            if "rotary_emb." in name or (".self_attn." in name and name.rsplit(".", 2)[-2] in _SHARED_WEIGHTS):
                continue
            if name == "masked_embedding.token_ordering":
                w = w.astype(mx.int32)
            out[name] = w
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)  # the same tensor as the embedding
        return out


_SHARED_WEIGHTS = ("k_proj", "v_proj", "k_norm", "v_norm")  # what a KV-shared layer never uses
