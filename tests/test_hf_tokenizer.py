"""mlx_gemma.hf_tokenizer: a Gemma 4 tokenizer.json rebuilt as a SentencePiece model encodes and
decodes as the `tokenizers` library does on the file (and as the tokenizer.model it was made from);
a tokenizer.json-only Gemma 4 folder loads and generates; bad files give typed errors."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece as spm

import mlx_gemma
from mlx_gemma.convert import convert
from mlx_gemma.errors import ConfigError, TokenizerError
from mlx_gemma.hf_tokenizer import model_proto_from_tokenizer_json
from mlx_gemma.tokenizer import GemmaTokenizer

FIXTURES = Path(__file__).parent / "fixtures"
JSON = FIXTURES / "gemma4_tokenizer_json" / "tokenizer.json"  # made by make_gemma4_tokenizer_json.py
SPM = FIXTURES / "gemma4_tokenizer" / "tokenizer.model"  # what that file was converted from

TEXTS = [
    "", " ", "x", " x", "Hello world", "The capital of France is Paris.",
    "  leading spaces,   runs   and trailing  ", "line\nbreaks\n\n\nand\ttabs\t\t \r\n",
    "中文字符 日本語のテキスト 한국어", "emoji 😀👍🏽 and 🇫🇷 flags", "1234567890 digits 3.14",
    "<|turn>user\nHi there<turn|>\n<|turn>model\n", "<|image|><|audio|> <|\"|>quoted<|\"|>",
    "<|think|><|channel>thought\nhmm<channel|>", "<bos><eos><pad><unk><mask>",
    "<|turn partial <turn| >", "café naïve Ωmega ß", "\u00a0non-breaking\u2009thin", "▁already▁escaped",
]


def _random_texts(n: int) -> list[str]:
    """Seeded mixes of ASCII, whitespace, CJK, emoji and special-token literals."""
    rng = random.Random(0)
    parts = ["the", " ", "  ", "\n", "\t", "Paris", "是", "語", "😀", "é", "<|turn>", "<turn|>", "<|image|>",
             "ab", "9", "<", "|>", "▁", "?", "capital"]
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def rebuilt() -> bytes:
    return model_proto_from_tokenizer_json(JSON)


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("json_only")
    shutil.copy(JSON, folder / "tokenizer.json")
    return folder


# ----- against the `tokenizers` library on the file ----------------------------------------

@pytest.mark.oracle
def test_ids_and_text_equal_tokenizers_library(rebuilt, json_folder):
    from tokenizers import Tokenizer  # the reference implementation, imported only by this test

    hf = Tokenizer.from_file(str(JSON))
    sp = spm.SentencePieceProcessor(model_proto=rebuilt)
    tok = GemmaTokenizer.from_folder(json_folder)
    for text in TEXTS + _random_texts(300):
        want = hf.encode(text, add_special_tokens=False).ids
        # GemmaTokenizer matches special literals only when asked; the library always does.
        assert tok.encode(text, add_bos=False, parse_special=True) == want, text
        if not {"<bos>", "<eos>", "<pad>", "<unk>"} & {hf.id_to_token(i) for i in want}:
            # SentencePiece never matches CONTROL pieces in text, and decodes them (and <unk>) its own way.
            assert sp.encode(text) == want, text
            assert tok.decode(want) == hf.decode(want, skip_special_tokens=False)
            assert "\u2581" in text or tok.decode(want) == text  # both read a typed '▁' back as a space


@pytest.mark.oracle
def test_pieces_equal_tokenizers_vocabulary(rebuilt):
    from tokenizers import Tokenizer  # the reference implementation, imported only by this test

    hf = Tokenizer.from_file(str(JSON))
    sp = spm.SentencePieceProcessor(model_proto=rebuilt)
    assert sp.get_piece_size() == hf.get_vocab_size()
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == [hf.id_to_token(i) for i in range(sp.get_piece_size())]


# ----- against the SentencePiece model the file was made from -------------------------------

def test_rebuilt_encodes_as_source_model(rebuilt, json_folder):
    source, sp = spm.SentencePieceProcessor(model_file=str(SPM)), spm.SentencePieceProcessor(model_proto=rebuilt)
    for text in TEXTS + _random_texts(300):
        assert sp.encode(text) == source.encode(text), text
        assert sp.decode(sp.encode(text)) == source.decode(source.encode(text))
    ours, theirs = GemmaTokenizer.from_folder(json_folder), GemmaTokenizer(str(SPM))
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.unk_id) == (theirs.bos_id, theirs.eos_id, theirs.pad_id, theirs.unk_id)
    assert ours.special_ids == theirs.special_ids and ours.eos_token_ids == theirs.eos_token_ids
    assert ours.chat_format == "gemma4" and ours.path == str(json_folder / "tokenizer.json")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text)  # typed specials stay text in both


@pytest.fixture(scope="module")
def generic_json(tmp_path_factory) -> Path:
    """tokenizer.json as transformers' generic SentencePiece converter writes it (AutoTokenizer on a
    tokenizer.model-only folder, so what mlx-lm's convert leaves): the user-defined pieces isolated
    by a pre-tokenizer regex, `ignore_merges` set, and only <pad>/<eos>/<bos>/<unk> as added tokens."""
    from transformers import AutoTokenizer  # the reference writer, imported only by these tests

    folder = tmp_path_factory.mktemp("generic")
    shutil.copy(SPM, folder / "tokenizer.model")
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder / "out")
    path = folder / "out" / "tokenizer.json"
    data = json.loads(path.read_text())
    assert data["model"]["ignore_merges"] is True and len(data["added_tokens"]) == 4
    assert data["pre_tokenizer"]["pretokenizers"][0]["behavior"] == "Isolated"
    return path


@pytest.mark.oracle
def test_generic_converter_layout_encodes_as_source_and_library(generic_json):
    from tokenizers import Tokenizer  # the reference implementation, imported only by this test

    source = spm.SentencePieceProcessor(model_file=str(SPM))
    sp = spm.SentencePieceProcessor(model_proto=model_proto_from_tokenizer_json(generic_json))
    hf = Tokenizer.from_file(str(generic_json))
    assert [(sp.id_to_piece(i), sp.is_control(i), sp.is_byte(i), sp.is_unknown(i)) for i in range(sp.get_piece_size())] \
        == [(source.id_to_piece(i), source.is_control(i), source.is_byte(i), source.is_unknown(i))
            for i in range(source.get_piece_size())]
    # every piece typed whole is where `ignore_merges` could part from SentencePiece's merges
    whole = [source.id_to_piece(i).replace("\u2581", " ") for i in range(source.get_piece_size())
             if not (source.is_control(i) or source.is_byte(i) or source.is_unknown(i))]
    for text in TEXTS + _random_texts(300) + whole:
        want = source.encode(text)
        assert sp.encode(text) == want, text
        theirs = hf.encode(text, add_special_tokens=False).ids
        if not {"<bos>", "<eos>", "<pad>", "<unk>"} & {hf.id_to_token(i) for i in theirs}:
            assert theirs == want, text  # the library matches CONTROL literals typed in text; SentencePiece does not


def test_tokenizer_model_wins_over_tokenizer_json(tmp_path):
    shutil.copy(JSON, tmp_path / "tokenizer.json")
    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    assert GemmaTokenizer.from_folder(tmp_path).path == str(tmp_path / "tokenizer.model")


# ----- a Gemma 4 folder with only tokenizer.json -------------------------------------------

def test_tokenizer_json_only_folder_loads_and_generates(tmp_path):
    json_only, model_only = tmp_path / "json", tmp_path / "spm"
    for folder in (json_only, model_only):
        shutil.copytree(FIXTURES / "tiny_gemma4_e2b", folder, ignore=shutil.ignore_patterns("tokenizer.model"))
    shutil.copy(JSON, json_only / "tokenizer.json")
    shutil.copy(SPM, model_only / "tokenizer.model")
    model, tok = mlx_gemma.load(str(json_only))
    ref_model, ref_tok = mlx_gemma.load(str(model_only))
    assert tok.path == str(json_only / "tokenizer.json") and tok.chat_format == "gemma4"
    prompt = "The capital of France is"
    assert tok.encode(prompt) == ref_tok.encode(prompt)
    text = mlx_gemma.generate(model, tok, prompt, max_tokens=8)
    assert text and text == mlx_gemma.generate(ref_model, ref_tok, prompt, max_tokens=8)


def test_tokenizer_json_only_folder_converts_with_a_tokenizer_model(tmp_path):
    # The converter writes the rebuilt tokenizer.model beside the copied tokenizer.json.
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_gemma4_e2b", src, ignore=shutil.ignore_patterns("tokenizer.model"))
    shutil.copy(JSON, src / "tokenizer.json")
    convert(str(src), mlx_path=str(tmp_path / "out"))
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == model_proto_from_tokenizer_json(JSON)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == JSON.read_bytes()
    _, tok = mlx_gemma.load(str(tmp_path / "out"))
    assert tok.path == str(tmp_path / "out" / "tokenizer.model")
    assert tok.encode("Hello <|turn>", parse_special=True) == GemmaTokenizer(str(SPM)).encode("Hello <|turn>", parse_special=True)


# ----- bad files -------------------------------------------------------------------------

def _edited(tmp_path: Path, edit) -> Path:
    data = json.loads(JSON.read_text())
    edit(data)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data))
    return path


def _drop_byte(d):
    del d["model"]["vocab"]["<0x41>"]
    d["model"]["vocab"] = {p: i for i, p in enumerate(sorted(d["model"]["vocab"], key=d["model"]["vocab"].get))}


@pytest.mark.parametrize("edit, error, match", [
    (lambda d: d["model"].update(type="Unigram"), TokenizerError, "only Gemma.s BPE"),
    (lambda d: d["model"].update(byte_fallback=False), TokenizerError, "byte_fallback"),
    (lambda d: d["model"].update(continuing_subword_prefix="##"), TokenizerError, "continuing_subword_prefix"),
    (lambda d: d.update(normalizer={"type": "NFKC"}), TokenizerError, "normalizer"),
    (lambda d: d.update(pre_tokenizer={"type": "ByteLevel"}), TokenizerError, "pre_tokenizer"),
    (lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                                       d["normalizer"]]}), TokenizerError, "normalizer"),
    (lambda d: d.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\s+|<mask>"},
                                       "behavior": "Isolated", "invert": False}), TokenizerError, "pre_tokenizer"),
    (lambda d: d.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "<mask>|<nope>"},
                                       "behavior": "Isolated", "invert": False}), ConfigError, "<nope>"),
    (lambda d: d["added_tokens"][5].update(lstrip=True), TokenizerError, "strips spaces"),
    (_drop_byte, TokenizerError, "byte pieces"),
    (lambda d: d["model"]["vocab"].update({"<pad>": 7}), ConfigError, "ids must be"),
    (lambda d: d["model"].update(vocab=[]), ConfigError, "model.vocab"),
    (lambda d: d["model"].update(merges=[["▁", "nope"]]), ConfigError, "merges\\[0\\]"),
    (lambda d: d["model"].update(merges="x"), ConfigError, "merges"),
    (lambda d: d.update(added_tokens=[{"id": 9999, "content": "<x>"}]), ConfigError, "added token"),
    (lambda d: d["model"].update(unk_token="<none>"), ConfigError, "unk_token"),
    (lambda d: d.pop("model"), ConfigError, "'model' is missing"),
])
def test_bad_file_is_a_typed_error_naming_it(tmp_path, edit, error, match):
    path = _edited(tmp_path, edit)
    with pytest.raises(error, match=match) as info:
        model_proto_from_tokenizer_json(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("drop", ["every", "one"])
def test_unlisted_split_is_refused(tmp_path, drop):
    # Drop the merges (or one merge) that make a piece: SentencePiece would still join those parts,
    # the library would not.
    merges = json.loads(JSON.read_text())["model"]["merges"]
    victim = "".join(merges[0])
    kept = [m for m in merges if "".join(m) != victim] if drop == "every" else merges[1:]
    path = _edited(tmp_path, lambda d: d["model"].update(merges=kept))
    with pytest.raises(TokenizerError, match="made by no merge"):
        model_proto_from_tokenizer_json(path)


def test_converter_refuses_a_bad_tokenizer_json_before_writing(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny_gemma4_e2b", src, ignore=shutil.ignore_patterns("tokenizer.model"))
    (src / "tokenizer.json").write_text(JSON.read_text().replace('"BPE"', '"WordPiece"'))
    with pytest.raises(TokenizerError, match="only Gemma") as info:
        convert(str(src), mlx_path=str(tmp_path / "out"))
    assert info.value.path == str(src / "tokenizer.json") and not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json_is_a_config_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        GemmaTokenizer.from_folder(tmp_path)
    assert info.value.path == str(path)


def test_oversized_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("mlx_gemma.hf_tokenizer.MAX_TOKENIZER_JSON_BYTES", 1000)
    with pytest.raises(ConfigError, match="more than the 1000"):
        model_proto_from_tokenizer_json(JSON)


@pytest.mark.oracle
def test_gemma3_shaped_tokenizer_converted_by_transformers(tmp_path):
    # The Gemma 1-3 test tokenizer through transformers' own slow->fast conversion: another merge list.
    from tokenizers import Tokenizer  # the reference implementations, imported only by this test
    from transformers import GemmaTokenizer as HFGemmaTokenizer

    shutil.copy(FIXTURES / "tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    HFGemmaTokenizer.from_pretrained(tmp_path).save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "tokenizer.json"
    hf, sp = Tokenizer.from_file(str(path)), spm.SentencePieceProcessor(model_proto=model_proto_from_tokenizer_json(path))
    texts = [t.replace("<|turn>", "<start_of_turn>").replace("<turn|>", "<end_of_turn>") for t in TEXTS + _random_texts(200)]
    for text in texts:
        want = hf.encode(text, add_special_tokens=False).ids
        if not {"<bos>", "<eos>", "<pad>", "<unk>"} & {hf.id_to_token(i) for i in want}:
            assert sp.encode(text) == want, text


def _synthetic_tokenizer_json(path: Path, n_pieces: int) -> list[str]:
    """A Gemma-shaped tokenizer.json with a long merge list: random pieces joined from earlier ones,
    every split of each listed as a merge, in piece order (as transformers' extractor lists them);
    returns the characters it is built on."""
    rng = random.Random(1)
    data = json.loads(JSON.read_text())
    chars = [chr(c) for c in range(0x61, 0x7B)] + ["\u2581", "\n"] + [chr(0x4E00 + i) for i in range(40)]
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), *chars]
    seen, pool = set(pieces), list(chars)
    while len(pieces) < n_pieces:
        p = rng.choice(pool) + rng.choice(pool)
        if p not in seen and len(p) <= 10:
            seen.add(p)
            pieces.append(p)
            pool.append(p)
    merges = [[p[:k], p[k:]] for p in pieces[260 + len(chars):] for k in range(1, len(p))
              if p[:k] in seen and p[k:] in seen]
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 4]  # <pad> <eos> <bos> <unk>
    data["model"].update(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)
    path.write_text(json.dumps(data))
    return chars


@pytest.mark.oracle
def test_long_merge_list_equals_tokenizers_library(tmp_path):
    from tokenizers import Tokenizer  # the reference implementation, imported only by this test

    path = tmp_path / "tokenizer.json"
    chars = _synthetic_tokenizer_json(path, 4000)
    assert len(json.loads(path.read_text())["model"]["merges"]) > 3600  # some pieces have several splits
    hf, sp = Tokenizer.from_file(str(path)), spm.SentencePieceProcessor(model_proto=model_proto_from_tokenizer_json(path))
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choice(chars + [" ", "  ", "😀"]) for _ in range(rng.randint(1, 120)))
        assert sp.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
