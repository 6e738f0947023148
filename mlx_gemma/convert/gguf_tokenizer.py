"""Rebuild a SentencePiece `tokenizer.model` from the vocabulary in a GGUF file's metadata.

llama.cpp keeps SentencePiece's pieces, scores and types in `tokenizer.ggml.*`;
here they become a `ModelProto` again, which SentencePiece loads as the original.

What llama.cpp does to the pieces (`TextModel._create_vocab_sentencepiece` in
`convert_hf_to_gguf.py`): text, score and type are kept, except that every HF
*added* token is rewritten.  A special one becomes CONTROL (type 3) with score
-1000, which is why `<unk>`, `<start_of_turn>` and the `<unusedN>` pieces are
CONTROL in a GGUF; a non-special one becomes USER_DEFINED (type 4) with its `▁`
replaced by spaces.  We map back: the bos/eos/pad pieces stay CONTROL, the unk
piece is UNKNOWN, every other CONTROL piece becomes USER_DEFINED (so
`<start_of_turn>` typed in text encodes to its id, as with the original
tokenizer.model and HF), and spaces in USER_DEFINED pieces become `▁` again.
"""

from __future__ import annotations

import re

import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as spm

from ..arguments import is_integer
from ..chat_template import GEMMA4_END_TURN, GEMMA4_STOP_PIECES, GEMMA4_TURN
from ..errors import TokenizerError

# llama.cpp token types (SentencePieceTokenTypes / gguf.TokenType)
_TOK_NORMAL, _TOK_UNKNOWN, _TOK_CONTROL, _TOK_USER_DEFINED, _TOK_UNUSED, _TOK_BYTE = 1, 2, 3, 4, 5, 6


def special_ids(path: str, meta: dict, n_tokens: int) -> dict:
    """{bos, eos, unk, pad[, eot]: token id} from the metadata (SentencePiece's defaults where absent)."""
    out = {}
    for key, gguf_key, default in (
        ("bos", "tokenizer.ggml.bos_token_id", 2),
        ("eos", "tokenizer.ggml.eos_token_id", 1),
        ("unk", "tokenizer.ggml.unknown_token_id", 3),
        ("pad", "tokenizer.ggml.padding_token_id", 0),
    ):
        v = meta.get(gguf_key, default)
        if not is_integer(v) or not 0 <= int(v) < n_tokens:
            raise TokenizerError(path, f"{gguf_key} = {v!r} is not a token id (vocabulary has {n_tokens})")
        out[key] = int(v)
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if is_integer(eot) and 0 <= int(eot) < n_tokens:
        out["eot"] = int(eot)
    return out


def stop_ids(pieces: list[str], specials: dict) -> list[int]:
    """What generation_config.json's `eos_token_id` lists: <eos> first; then, for a Gemma 4
    vocabulary (<|turn> ... <turn|>), <turn|> and <|tool_response> (Gemma 4's generation_config; a
    GGUF keeps one eos id, and transformers 5.25's GGUF loader restores these three), else
    `<end_of_turn>`; the file's end-of-turn id (`tokenizer.ggml.eot_token_id`) too, without repeats."""
    index = {p: i for i, p in enumerate(pieces)}
    if GEMMA4_TURN in index and GEMMA4_END_TURN in index:
        ends = [index.get(p) for p in GEMMA4_STOP_PIECES] + [specials.get("eot")]
    else:
        ends = [specials.get("eot"), index.get("<end_of_turn>")]
    out = [specials["eos"]]
    for i in ends:
        if i is not None and i not in out:
            out.append(i)
    return out


def build_tokenizer(path: str, meta: dict) -> tuple[bytes, dict, list[str]]:
    """(tokenizer.model bytes, special token ids, the pieces as SentencePiece will hold them)."""
    tokens, scores, types = _vocabulary(path, meta)
    specials = special_ids(path, meta, len(tokens))
    try:
        pieces = [t.decode("utf-8") for t in tokens]
    except UnicodeDecodeError as e:
        raise TokenizerError(path, f"a token is not valid UTF-8: {e}") from None

    proto = spm.ModelProto()
    n_bytes = 0
    seen: set[str] = set()
    for i, (piece, ttype, score) in enumerate(zip(pieces, types.tolist(), scores.tolist())):
        ptype, piece = _piece_type(path, i, piece, ttype, specials)
        n_bytes += ptype == spm.ModelProto.SentencePiece.BYTE
        if not piece:
            raise TokenizerError(path, f"token {i} is empty")
        if piece in seen:
            raise TokenizerError(path, f"token {piece!r} (id {i}) appears twice")
        seen.add(piece)
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, score, ptype
        pieces[i] = piece

    _set_trainer_spec(proto.trainer_spec, pieces, specials, byte_fallback=n_bytes == 256)
    _set_normalizer_spec(path, proto.normalizer_spec, meta)
    data = proto.SerializeToString()

    # Make sure SentencePiece accepts what we built.
    sp_proc = sentencepiece.SentencePieceProcessor()
    try:
        sp_proc.LoadFromSerializedProto(data)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises RuntimeError/OSError
        raise TokenizerError(path, f"rebuilt tokenizer.model is rejected by sentencepiece: {e}") from None
    return data, specials, pieces


def _vocabulary(path: str, meta: dict) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """The tokens, their float32 scores and their llama.cpp types, each checked against the others."""
    model = meta.get("tokenizer.ggml.model")
    if not isinstance(model, bytes) or model != b"llama":
        raise TokenizerError(
            path,
            f"tokenizer.ggml.model is {model!r}: only SentencePiece vocabularies ('llama') can be "
            "rebuilt into a tokenizer.model",
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, bytes) for t in tokens):
        raise TokenizerError(path, "tokenizer.ggml.tokens is missing or not a list of strings")
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores")
    if not isinstance(scores, np.ndarray) or scores.shape != (n,) or scores.dtype.kind != "f":
        raise TokenizerError(path, f"tokenizer.ggml.scores is missing or not {n} floats")
    # Checked as float32, SentencePiece's type: 1e300 in a float64 array is infinite there.
    with np.errstate(over="ignore"):
        scores = scores.astype(np.float32)
    if not np.all(np.isfinite(scores)):
        raise TokenizerError(path, "tokenizer.ggml.scores contains NaN or infinity (as float32)")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.full(n, _TOK_NORMAL, dtype=np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (n,) or types.dtype.kind not in "iu":
        raise TokenizerError(path, f"tokenizer.ggml.token_type is not {n} integers")
    return tokens, scores, types


def _piece_type(path: str, i: int, piece: str, ttype: int, specials: dict) -> tuple[int, str]:
    """SentencePiece's type for token `i` of llama.cpp type `ttype`, and its piece as SentencePiece holds it."""
    P = spm.ModelProto.SentencePiece
    if i == specials["unk"]:
        return P.UNKNOWN, piece
    if i in (specials["bos"], specials["eos"], specials["pad"]):
        return P.CONTROL, piece
    if ttype in (_TOK_CONTROL, _TOK_USER_DEFINED, _TOK_UNKNOWN):
        # llama.cpp writes HF added tokens as CONTROL (special) or USER_DEFINED with
        # '▁' turned into ' '; SentencePiece matches USER_DEFINED pieces in text.
        return P.USER_DEFINED, piece.replace(" ", "\u2581")
    if ttype == _TOK_BYTE:
        if not re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            raise TokenizerError(path, f"byte token {i} is {piece!r}, expected <0xXX>")
        return P.BYTE, piece
    if ttype == _TOK_UNUSED:
        return P.UNUSED, piece
    if ttype == _TOK_NORMAL:
        return P.NORMAL, piece
    raise TokenizerError(path, f"token {i} ({piece!r}) has unknown token type {ttype}")


def _set_trainer_spec(ts, pieces: list[str], specials: dict, byte_fallback: bool) -> None:
    """A BPE model of these pieces, with Gemma's splitting rules and special ids."""
    ts.model_type = ts.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = byte_fallback
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    ts.split_by_whitespace = True
    ts.treat_whitespace_as_suffix = False
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = specials["unk"], specials["bos"], specials["eos"], specials["pad"]
    ts.unk_piece, ts.bos_piece = pieces[specials["unk"]], pieces[specials["bos"]]
    ts.eos_piece, ts.pad_piece = pieces[specials["eos"]], pieces[specials["pad"]]


def _set_normalizer_spec(path: str, ns, meta: dict) -> None:
    """No normalisation, whitespace escaped to '▁', a leading space only when the file says so."""
    ns.name = "identity"
    add_space = meta.get("tokenizer.ggml.add_space_prefix", False)
    if not (isinstance(add_space, bool) or is_integer(add_space)):
        raise TokenizerError(path, f"tokenizer.ggml.add_space_prefix should be true or false, got {add_space!r:.80}")
    ns.add_dummy_prefix = bool(add_space)
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
