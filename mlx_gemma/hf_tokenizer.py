"""Rebuild a SentencePiece `tokenizer.model` from a Hugging Face `tokenizer.json` (Gemma 4 folders ship only that).

Gemma's tokenizer.json (transformers' GemmaTokenizer, `"backend": "tokenizers"`) is a BPE model
with byte fallback: spaces become '▁' (normalizer), no pre-splitting that matters, merges applied
in rank order, and the special tokens as added tokens.  transformers' generic SentencePiece converter
(what `AutoTokenizer` writes for a tokenizer.model-only folder, so what mlx-lm's convert leaves) has
only <pad>/<eos>/<bos>/<unk> as added tokens and instead isolates the user-defined pieces with a
pre-tokenizer regex, setting `ignore_merges` so each comes out whole: those pieces become USER_DEFINED
here too.  `ignore_merges` also emits any whole chunk that is a piece; SentencePiece merges such a
chunk to itself unless the piece's own merges cannot reach it, and there this follows SentencePiece,
the tokenizer Google trains with and the one the file was converted from.  SentencePiece's BPE instead merges the
adjacent pair whose joined piece has the highest score, so the merge of rank r gives its piece the
score -r: the same pair wins at every step.  Byte pieces `<0xXX>` become BYTE pieces; added
tokens become CONTROL (<bos>, <eos>, <pad>), UNKNOWN (<unk>) or USER_DEFINED (matched whole in
text, as the `tokenizers` library matches added tokens).  The file is untrusted: size-capped,
and every field used is checked, a malformed one a ConfigError naming the file.
"""

from __future__ import annotations

import os
import re

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from .errors import ConfigError, TokenizerError
from .json_input import expect, field, read_json

MAX_TOKENIZER_JSON_BYTES = 64 << 20  # Gemma 3's tokenizer.json is ~33 MB
_Piece = spm_pb2.ModelProto.SentencePiece
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
# The normalizer a Gemma tokenizer.json has (transformers' GemmaConverter.normalizer: Replace(" ", "▁")),
# and the pre-tokenizers that change nothing after it (GemmaConverter.pre_tokenizer splits on " ").
_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}
_REGEX_SYNTAX = set(".^$*+?{}[]()")
_NO_OP_SPLIT = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}


def model_proto_from_tokenizer_json(path: str | os.PathLike) -> bytes:
    """The serialized SentencePiece ModelProto that encodes and decodes as `path` does."""
    data = expect(read_json(path, MAX_TOKENIZER_JSON_BYTES), dict, path, "the file")
    model = field(data, "model", dict, path)
    pieces = _vocabulary(path, model)
    added = _added_tokens(path, data, pieces)
    isolated = _check_text_handling(path, data, pieces)
    scores, pairs = _merge_scores(path, model, pieces)
    types = _piece_types(path, added + isolated, model, pieces)
    _check_reachable(path, pieces, pairs, types)

    proto = spm_pb2.ModelProto()
    for i, piece in enumerate(pieces):
        sp = proto.pieces.add()
        sp.type = types[i]
        # SentencePiece matches USER_DEFINED pieces after normalization, which turned spaces into '▁'.
        sp.piece = piece.replace(" ", "\u2581") if types[i] == _Piece.USER_DEFINED else piece
        sp.score = scores.get(i, 0.0)
    _set_specs(proto, pieces)
    return proto.SerializeToString()


def _vocabulary(path, model: dict) -> list[str]:
    """The pieces in id order, after checking this is a Gemma-style BPE with byte fallback."""
    if model.get("type") != "BPE":
        raise TokenizerError(path, f"model.type is {model.get('type')!r:.40}: only Gemma's BPE is supported")
    if model.get("byte_fallback") is not True:
        raise TokenizerError(path, "model.byte_fallback is not true: Gemma's BPE falls back to bytes")
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key) not in (None, False):
            raise TokenizerError(path, f"model.{key} is set ({model[key]!r:.40}); Gemma's BPE has none")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError(path, "model.vocab should be a non-empty object of piece -> id")
    pieces: list[str | None] = [None] * len(vocab)
    for piece, i in vocab.items():
        if type(i) is not int or not 0 <= i < len(vocab) or pieces[i] is not None or not piece:
            raise ConfigError(path, f"model.vocab[{piece!r:.40}] = {i!r:.40}: ids must be "
                                    f"0..{len(vocab) - 1}, each once")
        pieces[i] = piece
    return pieces


def _check_text_handling(path, data: dict, pieces: list[str]) -> list[tuple[int, str]]:
    """Refuse text handling other than Gemma's: spaces become '▁', nothing else (no dummy prefix).
    Returns (id, piece) of the pieces a pre-tokenizer regex isolates (the generic converter's layout)."""
    norm = data.get("normalizer")
    steps = norm.get("normalizers") if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    if steps != [_REPLACE_SPACE]:
        raise TokenizerError(path, f"normalizer {norm!r:.120} is not Gemma's (spaces replaced by '▁')")
    pre = data.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    isolated: list[tuple[int, str]] = []
    for step in steps:
        if step in (None, _NO_OP_SPLIT):
            continue
        literals = _isolated_literals(step)
        if literals is None:
            raise TokenizerError(path, f"pre_tokenizer {pre!r:.120} is not Gemma's")
        ids = {p: i for i, p in enumerate(pieces)}
        for literal in literals:
            if literal not in ids:
                raise ConfigError(path, f"pre_tokenizer isolates {literal!r:.40}, which is not in model.vocab")
            isolated.append((ids[literal], literal))
    return isolated


def _isolated_literals(step) -> list[str] | None:
    """The pieces of a Split(Regex("a|b|..."), Isolated) whose alternatives are escaped literals, or None."""
    if not (isinstance(step, dict) and step.get("type") == "Split" and step.get("behavior") == "Isolated"
            and step.get("invert") is False and isinstance(step.get("pattern"), dict)
            and isinstance(step["pattern"].get("Regex"), str)):
        return None
    literals, current, chars = [], [], iter(step["pattern"]["Regex"])
    for c in chars:
        if c == "\\":
            escaped = next(chars, "")
            if not escaped or escaped.isalnum():  # \d, \s, ... are classes, not literals
                return None
            current.append(escaped)
        elif c == "|":
            literals.append("".join(current))
            current = []
        elif c in _REGEX_SYNTAX:
            return None
        else:
            current.append(c)
    literals.append("".join(current))
    return literals if all(literals) else None


def _merge_scores(path, model: dict, pieces: list[str]) -> tuple[dict[int, float], set[tuple[str, str]]]:
    """({id: score} of each merged piece, minus the rank of the first merge that makes it; the merged pairs)."""
    merges = model.get("merges")
    if not isinstance(merges, list):
        raise ConfigError(path, "model.merges should be a list")
    ids = {p: i for i, p in enumerate(pieces)}
    scores: dict[int, float] = {}
    pairs: set[tuple[str, str]] = set()
    for rank, m in enumerate(merges):
        # tokenizers writes a merge as "left right" (older files) or ["left", "right"].
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ConfigError(path, f"model.merges[{rank}] = {m!r:.60} is not a pair of pieces")
        left, right = pair
        if left not in ids or right not in ids or left + right not in ids:
            raise ConfigError(path, f"model.merges[{rank}] joins pieces not all in the vocabulary: {m!r:.60}")
        # float32 holds every integer up to 2**24 exactly, so the ranks stay distinct.
        scores.setdefault(ids[left + right], float(-rank - 1))
        pairs.add((left, right))
    return scores, pairs


def _added_tokens(path, data: dict, pieces: list[str]) -> list[tuple[int, str]]:
    """(id, content) of each added token, checked against `pieces`; those past model.vocab (transformers
    adds e.g. a missing <mask> there) are appended to `pieces`, their ids following on."""
    added = data.get("added_tokens", [])
    if not isinstance(added, list):
        raise ConfigError(path, "added_tokens should be a list")
    out = []
    for tok in sorted(added, key=_id_or_minus_one):
        i, content = (tok.get("id"), tok.get("content")) if isinstance(tok, dict) else (None, None)
        if type(i) is int and i == len(pieces) and isinstance(content, str) and content and content not in pieces:
            pieces.append(content)
        if type(i) is not int or not 0 <= i < len(pieces) or content != pieces[i]:
            raise ConfigError(path, f"added token {tok!r:.80} is not an {{id, content}} of a piece in model.vocab")
        if any(tok.get(key) for key in ("lstrip", "rstrip", "single_word")):
            raise TokenizerError(path, f"added token {content!r:.40} strips spaces or matches whole words; Gemma's do not")
        out.append((i, content))
    return out


def _id_or_minus_one(token) -> int:
    i = token.get("id") if isinstance(token, dict) else None
    return i if type(i) is int else -1


def _piece_types(path, added: list[tuple[int, str]], model: dict, pieces: list[str]) -> list[int]:
    """SentencePiece's type for each piece: added tokens, bytes, the rest NORMAL."""
    types = [_Piece.BYTE if _BYTE_PIECE.fullmatch(p) else _Piece.NORMAL for p in pieces]
    if sum(t == _Piece.BYTE for t in types) != 256:
        raise TokenizerError(path, "the vocabulary lacks some of the 256 byte pieces <0x00>..<0xFF> byte fallback needs")
    control = {"<bos>", "<eos>", "<pad>"}
    for i, content in added:
        types[i] = _Piece.CONTROL if content in control else _Piece.USER_DEFINED
    unk = model.get("unk_token")
    if unk not in pieces:
        raise ConfigError(path, f"model.unk_token {unk!r:.40} is not in model.vocab")
    types[pieces.index(unk)] = _Piece.UNKNOWN
    for name in sorted(control):
        if name not in pieces:
            raise TokenizerError(path, f"no {name} piece: not a Gemma vocabulary")
        types[pieces.index(name)] = _Piece.CONTROL
    return types


def _check_reachable(path, pieces: list[str], pairs: set[tuple[str, str]], types: list[int]) -> None:
    """Refuse a merge list SentencePiece would apply differently: it joins any two adjacent NORMAL
    pieces whose text is a piece, the `tokenizers` library only listed pairs.  A Gemma file lists
    every such split (transformers' SentencePiece extractor makes one merge per split)."""
    normal = {p for p, t in zip(pieces, types) if t == _Piece.NORMAL}
    for i, p in enumerate(pieces):
        if types[i] != _Piece.NORMAL:
            continue
        for k in range(1, len(p)):
            if p[:k] in normal and p[k:] in normal and (p[:k], p[k:]) not in pairs:
                raise TokenizerError(path, f"piece {p!r:.40} (id {i}) is made by no merge of {p[:k]!r:.20} and "
                                           f"{p[k:]!r:.20}, though both are pieces: SentencePiece cannot reproduce it")


def _set_specs(proto, pieces: list[str]) -> None:
    """A BPE model with byte fallback and Gemma's special ids; text normalized only by '▁' escaping."""
    unk = next(i for i, p in enumerate(proto.pieces) if p.type == _Piece.UNKNOWN)
    proto.trainer_spec.CopyFrom(spm_pb2.TrainerSpec(
        model_type=spm_pb2.TrainerSpec.BPE, vocab_size=len(pieces), byte_fallback=True, split_digits=True,
        allow_whitespace_only_pieces=True, treat_whitespace_as_suffix=False,
        unk_id=unk, unk_piece=pieces[unk],
        **{f"{name}_id": pieces.index(f"<{name}>") for name in ("bos", "eos", "pad")},
        **{f"{name}_piece": f"<{name}>" for name in ("bos", "eos", "pad")},
    ))
    proto.normalizer_spec.CopyFrom(spm_pb2.NormalizerSpec(
        name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False, escape_whitespaces=True,
    ))
