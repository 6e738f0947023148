"""Gemma's SentencePiece tokenizer: safe loading, special tokens, chat template, streaming decode.

* Files are untrusted: a `tokenizer.model` is size-checked and parsed with protobuf in
  Python before SentencePiece's C++ loader ever sees it (a malformed proto can crash it).
* Text a user types is text: "<start_of_turn>" typed in a prompt encodes as ordinary
  characters unless the caller asks for `parse_special=True`.
* The chat template is written in code, never executed from a checkpoint's Jinja: Gemma 1-3's
  `<start_of_turn>` format here, Gemma 4's `<|turn>` format in chat_template.py.  A Gemma 4
  vocabulary (it has `<|turn>` / `<turn|>`) gets Gemma 4's format, turn ids and stop ids.
* `StreamingDetokenizer` (detokenizer.py) turns ids into text one token at a time without
  ever emitting half a UTF-8 character, and its segments join to exactly `decode(all_ids)`.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sentencepiece as spm
from google.protobuf import unknown_fields
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from .arguments import is_integer
from .chat_template import (GEMMA4_STOP_PIECES, Gemma4Vocab, check_messages, check_unicode, gemma4_segments,
                            primes_empty_thought)
from .detokenizer import StreamingDetokenizer
from .errors import GenerationError, MlxGemmaError, TokenizerError
from .hf_tokenizer import model_proto_from_tokenizer_json
from .json_input import json_type, read_json

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # Gemma 3's is ~4.5 MiB; anything this big is not a tokenizer
_MAX_GENERATION_CONFIG_BYTES = 1024 * 1024
# Where a model folder keeps its chat template (read only to tell Gemma 4's size variants apart);
# tokenizer_config.json holds the whole vocabulary too (Gemma 3's is ~1.2 MB).
_TEMPLATE_FILES = (("chat_template.jinja", 4 << 20), ("chat_template.json", 4 << 20),
                   ("tokenizer_config.json", 64 << 20))

_Piece = spm_pb2.ModelProto.SentencePiece
_VALID_TYPES = frozenset(_Piece.Type.values())

# What a special token looks like.  Used both to pick the pieces to protect and, with
# parse_special=True, to find candidates in text (then looked up in a dict: a regex of
# Gemma 3's ~6,400 special strings would be slow).
_SPECIAL_SHAPE = re.compile(r"<[^<>\s]{1,64}>|\[[^\[\]\s]{1,64}\]")
# Gemma's vocabulary also holds HTML tags as USER_DEFINED pieces (<table>, </h1>, <b>, ...).
# They are markup, not control tokens: the reference tokenizers (HF, keras-hub) match
# them in any text, so we do too, and keep "<b>bold</b>" tokenized like upstream.
_MARKUP_TAGS = frozenset(
    "a b i u s em strong sub sup code span div p ul ol li table caption thead tbody tfoot "
    "tr th td h1 h2 h3 h4 h5 h6 blockquote html body img iframe footer header br hr pre bbox".split()
)


def _read_bounded(path: str, limit: int) -> bytes:
    if os.path.isdir(path):
        raise TokenizerError(path, "is a folder, expected a file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            data = f.read(limit + 1) if size <= limit else b""  # +1: it may grow meanwhile
    except FileNotFoundError:
        raise TokenizerError(path, "file not found") from None
    except OSError as e:
        raise TokenizerError(path, f"cannot read file: {e.strerror}") from None
    if size > limit or len(data) > limit:
        raise TokenizerError(path, f"file is {max(size, len(data))} bytes, more than the {limit} allowed")
    return data


def _parse_model_proto(data: bytes, path: str | None) -> spm_pb2.ModelProto:
    """Check everything we can in Python so that bad bytes never reach the C++ loader."""
    if not data:
        raise TokenizerError(path, "tokenizer file is empty")
    if len(data) > MAX_TOKENIZER_BYTES:
        raise TokenizerError(path, f"tokenizer is more than the {MAX_TOKENIZER_BYTES} bytes allowed")
    try:
        proto = spm_pb2.ModelProto.FromString(data)
    except Exception as e:  # any parse failure of untrusted bytes means "not a model"
        raise TokenizerError(path, f"not a SentencePiece model (protobuf parse failed: {e})") from None
    if not proto.pieces:
        raise TokenizerError(path, "SentencePiece model has no pieces")
    # Serialized pieces come first: a file cut short at a piece boundary still parses,
    # but loses the specs that follow (and would silently load as a default unigram model).
    if not proto.HasField("trainer_spec") or not proto.HasField("normalizer_spec"):
        raise TokenizerError(path, "SentencePiece model has no trainer/normalizer spec (truncated?)")
    seen, n_unknown = set(), 0
    for i, p in enumerate(proto.pieces):
        # protobuf hands back a string field that is not UTF-8 as bytes.
        if not isinstance(p.piece, str):
            raise TokenizerError(path, f"piece {i} ({p.piece[:64]!r}) is not valid UTF-8")
        # proto2 parks an out-of-range enum value among the unknown fields, so `p.type`
        # alone would read a bogus type as NORMAL.
        if p.type not in _VALID_TYPES or len(unknown_fields.UnknownFieldSet(p)):
            raise TokenizerError(path, f"piece {i} ({p.piece!r}) has a type outside the enum or unknown fields")
        if not p.piece:
            raise TokenizerError(path, f"piece {i} is empty")
        if p.piece in seen:
            raise TokenizerError(path, f"piece {i} ({p.piece!r}) appears twice")
        seen.add(p.piece)
        n_unknown += p.type == _Piece.UNKNOWN
    if n_unknown != 1:
        raise TokenizerError(path, f"SentencePiece model must have exactly one <unk> piece, has {n_unknown}")
    return proto


def _load_processor(proto_bytes: bytes, path: str | None) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=proto_bytes)
    except (RuntimeError, OSError, ValueError) as e:
        raise TokenizerError(path, f"SentencePiece refused the model: {e}") from None


def _is_special_piece(p: _Piece) -> bool:
    if p.type in (_Piece.CONTROL, _Piece.UNKNOWN):
        return True
    if p.type != _Piece.USER_DEFINED or not _SPECIAL_SHAPE.fullmatch(p.piece):
        return False
    return p.piece.strip("<>[]/") not in _MARKUP_TAGS


class GemmaTokenizer:
    """A SentencePiece `tokenizer.model` (or a Keras preset's `vocabulary.spm`) for Gemma.

    `proto` is the serialized model: bytes, or a path to read them from.
    `eos_token_ids` are the stop ids; by default `<eos>` plus `<end_of_turn>` if present, and for
    a Gemma 4 vocabulary `<eos>`, `<turn|>` and `<|tool_response>`, as Gemma 4's generation_config.
    `empty_thought` (Gemma 4) is whether the generation prompt closes an empty thought channel
    when thinking is off, as the 26B / 31B templates do (`from_folder` reads it from the folder's
    template; False, the E2B / E4B format, by default).
    """

    def __init__(self, proto: bytes | str | os.PathLike, eos_token_ids: Iterable[int] | None = None):
        if isinstance(proto, (bytes, bytearray, memoryview)):
            self.path, data = None, bytes(proto)
        else:
            self.path = os.fspath(proto)
            data = _read_bounded(self.path, MAX_TOKENIZER_BYTES)
        model = _parse_model_proto(data, self.path)
        self._sp = _load_processor(data, self.path)
        if self.bos_id < 0 or self.eos_id < 0:  # SentencePiece finds them by trainer_spec's piece names
            raise TokenizerError(self.path, "SentencePiece model has no <bos> or <eos> piece")
        self._special = {p.piece: i for i, p in enumerate(model.pieces) if _is_special_piece(p)}
        self._special_ids = frozenset(self._special.values())

        # SentencePiece matches USER_DEFINED pieces anywhere in the input, so plain text
        # "<start_of_turn>" would become that token.  A second processor in which those
        # pieces are UNUSED cannot produce them: BPE splits an UNUSED piece back into the
        # pieces it was merged from.  (CONTROL pieces are never matched in text anyway.)
        protected = [p for p in model.pieces if p.type == _Piece.USER_DEFINED and _is_special_piece(p)]
        for p in protected:
            p.type = _Piece.UNUSED
        self._plain = _load_processor(model.SerializeToString(), self.path) if protected else self._sp

        self._gemma4 = Gemma4Vocab.from_lookup(self.bos_id, self._optional_id)
        self.empty_thought = False
        if eos_token_ids is None:
            ends = GEMMA4_STOP_PIECES if self._gemma4 is not None else ("<end_of_turn>",)
            eos_token_ids = [self.eos_id, *(i for i in map(self._optional_id, ends) if i is not None)]
        self.eos_token_ids = frozenset(self._check_ids(eos_token_ids))
        self._start_of_image_id = self._optional_id("<start_of_image>")

    # ----- construction -------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos_token_ids: Iterable[int] | None = None) -> GemmaTokenizer:
        return cls(os.fspath(path), eos_token_ids)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> GemmaTokenizer:
        """Load `tokenizer.model` (HF / mlx layout), `assets/tokenizer/vocabulary.spm` (Keras
        preset) or else `tokenizer.json` (rebuilt by hf_tokenizer.py); stop ids come from
        `generation_config.json` when there is one."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise TokenizerError(folder, "folder not found")
        # Gemma 4 hub folders ship only tokenizer.json: rebuilt as the SentencePiece model it describes.
        for rel in ("tokenizer.model", os.path.join("assets", "tokenizer", "vocabulary.spm"), "tokenizer.json"):
            path = os.path.join(folder, rel)
            if os.path.isfile(path):
                break
        else:
            raise TokenizerError(folder, "no tokenizer.model, assets/tokenizer/vocabulary.spm or tokenizer.json in folder")
        config_path = os.path.join(folder, "generation_config.json")
        eos = _read_generation_eos(config_path)
        tokenizer = cls(model_proto_from_tokenizer_json(path) if rel == "tokenizer.json" else path)
        tokenizer.path = path
        if tokenizer.chat_format == "gemma4":
            tokenizer.empty_thought = primes_empty_thought(_read_chat_template(folder))
        if eos is not None:
            # Checked here, not by the constructor, so that the error blames the config.
            bad = next((i for i in eos if not 0 <= i < tokenizer.vocab_size), None)
            if bad is not None:
                raise TokenizerError(config_path, f"eos_token_id {bad} is outside the vocabulary "
                                                  f"(0..{tokenizer.vocab_size - 1}) of {path}")
            tokenizer.eos_token_ids = frozenset(eos)
        return tokenizer

    # ----- vocabulary ---------------------------------------------------------------

    # None where the vocabulary lacks the piece.  bos/eos/pad/unk come from trainer_spec.
    vocab_size = property(lambda self: self._sp.get_piece_size())
    bos_id = property(lambda self: self._sp.bos_id())
    eos_id = property(lambda self: self._sp.eos_id())
    pad_id = property(lambda self: self._sp.pad_id())
    unk_id = property(lambda self: self._sp.unk_id())
    # The ids that open and close a chat turn: Gemma 4's <|turn> / <turn|>, else <start_of_turn> / <end_of_turn>.
    start_of_turn_id = property(lambda self: self._gemma4.turn if self._gemma4 else self._optional_id("<start_of_turn>"))
    end_of_turn_id = property(lambda self: self._gemma4.end_turn if self._gemma4 else self._optional_id("<end_of_turn>"))
    # "gemma4" (<|turn> ... <turn|>), "gemma" (Gemma 1-3's <start_of_turn> ... <end_of_turn>), or None.
    chat_format = property(lambda self: "gemma4" if self._gemma4 else "gemma" if self.end_of_turn_id is not None
                           and self.start_of_turn_id is not None else None)
    image_token_id = property(lambda self: self._optional_id("<image>"))  # PaliGemma's placeholder

    # Ids of control-like pieces: those `decode(skip_special_tokens=True)` drops.
    special_ids = property(lambda self: self._special_ids)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of `piece`, or None if the vocabulary lacks it (SentencePiece would say <unk>)."""
        return self._optional_id(piece)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(self._check_ids([token_id])[0])

    def loc_token_id(self, i: int) -> int | None:
        """Id of PaliGemma's `<loc{i:04d}>`, i in 0..1023; None if the vocabulary lacks it."""
        return self._indexed_id("loc", i, 1024, 4)

    def seg_token_id(self, i: int) -> int | None:
        """Id of PaliGemma's `<seg{i:03d}>`, i in 0..127; None if the vocabulary lacks it."""
        return self._indexed_id("seg", i, 128, 3)

    def _indexed_id(self, name: str, i: int, count: int, digits: int) -> int | None:
        if not 0 <= i < count:  # a caller's bug, not a vocabulary question
            raise MlxGemmaError(f"<{name}> token index {i} is outside 0..{count - 1}")
        return self._optional_id(f"<{name}{i:0{digits}d}>")

    def _optional_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)  # returns unk_id for a missing piece
        return i if self._sp.id_to_piece(i) == piece else None

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        out, n = [int(i) for i in ids], self.vocab_size
        bad = next((i for i in out if not 0 <= i < n), None)
        if bad is not None:
            raise TokenizerError(self.path, f"token id {bad} is outside the vocabulary (0..{n - 1})")
        return out

    # ----- encode / decode ----------------------------------------------------------

    def encode(self, text: str | Sequence[str], add_bos: bool = True, add_eos: bool = False,
               parse_special: bool = False) -> list[int] | list[list[int]]:
        """Token ids of `text` (a list of texts gives a list of id lists).

        Special-token strings in `text` stay ordinary characters unless `parse_special`.
        """
        if not isinstance(text, str):
            return [self.encode(t, add_bos, add_eos, parse_special) for t in text]
        check_unicode(text, "the text")
        ids = self._encode_special(text) if parse_special else self._plain.encode(text)
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_special(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for m in _SPECIAL_SHAPE.finditer(text):
            special = self._special.get(m.group())
            if special is None:
                continue
            ids += self._plain.encode(text[start:m.start()])
            ids.append(special)
            start = m.end()
        return ids + self._plain.encode(text[start:])

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, exactly as SentencePiece decodes them (<bos>/<eos>/<pad> give "")."""
        if isinstance(ids, int) or getattr(ids, "ndim", 1) == 0:
            ids = [ids]
        elif hasattr(ids, "tolist"):  # numpy / mlx arrays
            ids = ids.tolist()
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._sp.decode(ids)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self, skip_special_tokens)

    # ----- keras-hub's GemmaTokenizer interface ---------------------------------------
    # Names and results as keras_hub.models.GemmaTokenizer (SentencePieceTokenizer):
    # no <bos>/<eos> added (the preprocessor's packer adds them), and text is encoded
    # exactly as SentencePiece does, so typed "<start_of_turn>" *is* that token, as
    # keras-hub's instruct prompts expect.  Lists of ids stand in for keras tensors.
    # (`from_preset` is the tasks layer's: mlx_gemma.tasks.GemmaTokenizer.)

    def tokenize(self, inputs: str | Sequence[str]) -> list[int] | list[list[int]]:
        """Ids of a string (a list of ids), or of each string of a list."""
        if isinstance(inputs, str):
            return self._sp.encode(check_unicode(inputs, "the text"))
        if isinstance(inputs, Sequence) and all(isinstance(t, str) for t in inputs):
            return [self._sp.encode(check_unicode(t, f"text {i}")) for i, t in enumerate(inputs)]
        raise TokenizerError(self.path, f"tokenize() takes a string or a list of strings, got {type(inputs).__name__}")

    __call__ = tokenize

    def detokenize(self, inputs) -> str | list[str]:
        """Text of an id list (or one id, or a 1-D array); a list of texts for a batch (2-D)."""
        if hasattr(inputs, "tolist"):  # numpy / mlx arrays
            inputs = inputs.tolist()
        if isinstance(inputs, Sequence) and inputs and isinstance(inputs[0], Sequence):
            return [self.decode(row) for row in inputs]
        return self.decode(inputs)

    def vocabulary_size(self) -> int:
        return self.vocab_size

    def get_vocabulary(self) -> list[str]:
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def id_to_token(self, token_id: int) -> str:
        return self.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int:
        """The id of a piece; <unk>'s id for a string that is not one (as keras-hub and SentencePiece)."""
        i = self._optional_id(token)
        return self.unk_id if i is None else i

    start_token_id = property(lambda self: self.bos_id)
    end_token_id = property(lambda self: self.eos_id)
    pad_token_id = property(lambda self: self.pad_id)
    # What keras-hub's generate_postprocess strips: its start, end and pad tokens.
    special_token_ids = property(lambda self: sorted({self.bos_id, self.eos_id, self.pad_id} - {-1}))

    # ----- chat ---------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = True,
                            tokenize: bool = False, image_block: Sequence | None = None,
                            audio_block: Sequence | None = None, enable_thinking: bool = False,
                            empty_thought: bool | None = None, tools: Sequence | None = None) -> str | list[int]:
        """Gemma's turn format (matching the official Gemma 2/3 templates, content trimmed):

            <bos><start_of_turn>user\\n{system}\\n\\n{user}<end_of_turn>\\n<start_of_turn>model\\n...

        or, for a Gemma 4 vocabulary, Gemma 4's (mlx_gemma.chat_template: a system turn of its own,
        `<|turn>user\\n{user}<turn|>\\n<|turn>model\\n`; `enable_thinking` turns its thinking mode on;
        `empty_thought` overrides the tokenizer's choice of generation prompt).

        With `tokenize=True`, message text is encoded as plain text: a user who types
        "<end_of_turn>" cannot forge a turn.  An image part renders as `<start_of_image>` (Gemma 4:
        `<|image|>`, an audio part `<|audio|>`); `image_block` (text and ids) replaces each, before
        tokenizing, as the processor expands it in the rendered string (Gemma 3:
        `mlx_gemma.image_chat.image_block`); a list of such blocks gives each image its own, in order
        (pan & scan: an image and its crops; Gemma 4: each image's own number of soft tokens).
        `audio_block` does the same for audio parts.  `tools` (OpenAI function tools, Gemma 4 only;
        see mlx_gemma.tool_calls) are declared in the system turn.
        """
        if self._gemma4 is not None:
            thought = self.empty_thought if empty_thought is None else empty_thought
            segments = gemma4_segments(self._gemma4, messages, add_generation_prompt, enable_thinking, thought,
                                       self.path, tools)
            markers = (self._gemma4.media["<|image|>"], self._gemma4.media["<|audio|>"])
        else:
            if enable_thinking:
                raise GenerationError("enable_thinking: Gemma 1-3 have no thinking mode (Gemma 4 has)")
            if tools:
                raise GenerationError("tools: mlx_gemma renders tool declarations in Gemma 4's format only")
            segments, markers = self._chat_segments(messages, add_generation_prompt), (self._start_of_image_id, None)
        for marker, block in zip(markers, (image_block, audio_block)):
            if block is not None:
                segments = _splice(segments, marker, block)
        if not tokenize:
            return "".join(self._sp.id_to_piece(s) if isinstance(s, int) else s for s in segments)
        ids: list[int] = []
        # Adjacent text is encoded as one run, as it appears in the rendered string.
        for is_text, run in itertools.groupby(segments, key=lambda s: isinstance(s, str)):
            ids += self._plain.encode("".join(run)) if is_text else list(run)
        return ids

    def _chat_segments(self, messages: Sequence[Mapping], add_generation_prompt: bool) -> list:
        """The conversation as a list of special-token ids (int) and text (str)."""
        sot, eot = self.start_of_turn_id, self.end_of_turn_id
        if sot is None or eot is None:
            raise TokenizerError(self.path, "vocabulary has no <start_of_turn>/<end_of_turn>: not a chat model")
        messages = check_messages(messages)
        system: list | None = None
        if messages[0]["role"] == "system":
            # Gemma 3 folds the system prompt into the first user turn (untrimmed, as it does).
            system = self._content(messages[0]["content"], 0, trim=False, images=False) + ["\n\n"]
            messages = messages[1:]
            if not messages:
                raise GenerationError("a system message must be followed by a user message")
        offset = 1 if system is not None else 0
        segments: list = [self.bos_id]
        for i, m in enumerate(messages):
            role = {"assistant": "model"}.get(m["role"], m["role"])
            expected = "user" if i % 2 == 0 else "model"
            if role != expected:
                raise GenerationError(
                    f"message {i + offset} has role {m['role']!r} where {expected!r} was expected: roles must "
                    "alternate user/model(assistant), starting with user, after an optional first system message")
            body = self._content(m["content"], i + offset, trim=True, images=True)
            if i == 0 and system is not None:
                body = system + body
            segments += [sot, f"{role}\n", *body, eot, "\n"]
        if add_generation_prompt:
            segments += [sot, "model\n"]
        return segments

    def _content(self, content, index: int, trim: bool, images: bool) -> list:
        if isinstance(content, str):
            check_unicode(content, f"message {index}: 'content'")
            return [content.strip() if trim else content]
        if not isinstance(content, Sequence):
            raise GenerationError(f"message {index}: content must be a string or a list of parts")
        out: list = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "text" and isinstance(part.get("text"), str):
                check_unicode(part["text"], f"message {index}: content part {j}'s 'text'")
                out.append(part["text"].strip() if trim else part["text"])
            elif kind == "image" and images:
                if self._start_of_image_id is None:
                    raise TokenizerError(self.path, "vocabulary has no <start_of_image>: this model cannot take images")
                out.append(self._start_of_image_id)
            else:
                raise GenerationError(f"message {index}: unsupported content part {j}: {part!r:.80}")
        return out


def _splice(segments: list, marker: int | None, block: Sequence) -> list:
    """`segments` with each `marker` id replaced by `block`, or by the next of a list of blocks."""
    per_item = block and isinstance(block[0], list)
    blocks = iter(block) if per_item else itertools.repeat(block)
    return [p for s in segments for p in (next(blocks) if isinstance(s, int) and s == marker else [s])]


def _read_chat_template(folder: str) -> str:
    """The folder's chat template (Jinja source), "" if it has none: chat_template.jinja, else the
    `chat_template` of chat_template.json or tokenizer_config.json (a string, or a list of named ones)."""
    for name, limit in _TEMPLATE_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".jinja"):
            return _read_bounded(path, limit).decode("utf-8", errors="replace")
        config: Any = read_json(path, limit, TokenizerError)
        template = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, ...]
            template = " ".join(t["template"] for t in template if isinstance(t, dict) and isinstance(t.get("template"), str))
        if isinstance(template, str):
            return template
    return ""


def _read_generation_eos(path: str) -> list[int] | None:
    """Stop ids from `generation_config.json` (an int or a list), None if absent."""
    if not os.path.exists(path):
        return None
    if os.path.isdir(path):
        raise TokenizerError(path, "is a folder, expected a file")
    config: Any = read_json(path, _MAX_GENERATION_CONFIG_BYTES, TokenizerError)
    eos = config.get("eos_token_id") if isinstance(config, dict) else None
    if eos is None:
        return None
    eos = [eos] if is_integer(eos) else eos
    if not isinstance(eos, list) or not eos or not all(is_integer(i) for i in eos):
        raise TokenizerError(path, f"'eos_token_id' must be an integer or a non-empty array of integers, "
                                   f"found {json_type(eos)}: {eos!r:.80}")
    return eos


def check_vocab_fits(tokenizer: GemmaTokenizer, embedding_rows: int, path: str | os.PathLike | None) -> None:
    """Raise if the tokenizer can produce ids the embedding has no row for.

    (More rows than pieces is normal: Gemma 3 pads its embedding to 262,208 rows.)
    """
    if tokenizer.vocab_size > embedding_rows:
        raise TokenizerError(path, f"tokenizer has {tokenizer.vocab_size} pieces but the model's embedding "
                                   f"has only {embedding_rows} rows: tokenizer and weights do not match")
