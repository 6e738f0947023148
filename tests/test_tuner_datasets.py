"""Fine-tuning data: JSONL formats, prompt masking, batching, truncation, and bad input.

The token ids come from the tokenizer's own calls (encode, apply_chat_template);
each test checks how tuner/datasets.py combines them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.optimizers as optim

from mlx_gemma import lora as lora_cli
from mlx_gemma.errors import DatasetError, TrainingError
from mlx_gemma.loading import load
from mlx_gemma.tuner import trainer
from mlx_gemma.tuner.datasets import iterate_batches, load_datasets, load_jsonl, make_batch, training_images

from conftest import FIXTURES
PAIRS = [("What is two plus two?", " Four, of course."), ("Name a colour", " Blue"),
         ("Say hello in French, please, and then say goodbye", " Bonjour. Au revoir."), ("Hi", " Hello!")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_tokenizer():
    return load(FIXTURES / "tiny_gemma")[1]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def pair_batch(tokenizer, tmp_path, mask_prompt=True):
    file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    return make_batch(load_jsonl(file, tokenizer, mask_prompt=mask_prompt), pad_id=tokenizer.pad_id)



def test_formats_and_prompt_masking(tokenizer, tmp_path):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "plain text"}, {"prompt": "Q:", "completion": " A"},
                                              {"messages": messages}])
    (t_ids, t_off), (p_ids, p_off), (m_ids, m_off) = load_jsonl(file, tokenizer, mask_prompt=True)
    assert t_ids == tokenizer.encode("plain text", add_eos=True) and t_off == 0
    head = tokenizer.encode("Q:")
    assert p_ids == head + tokenizer.encode(" A", add_bos=False, add_eos=True) and p_off == len(head)
    assert m_ids == tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True)
    assert m_off == len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=True))
    assert load_jsonl(file, tokenizer)[1][1] == 0  # without mask_prompt: loss on everything


def test_batches_weight_only_completion_tokens(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    examples = load_jsonl(file, tokenizer, mask_prompt=True)
    inputs, targets, weights = make_batch(examples, pad_id=tokenizer.pad_id)
    assert inputs.shape[1] % 32 == 0
    for row, (ids, offset) in enumerate(examples):
        picked = np.array(targets[row])[np.array(weights[row]) > 0].tolist()
        assert picked == ids[offset:]  # exactly the completion (with its <eos>)
        assert np.array(inputs[row])[:len(ids) - 1].tolist() == ids[:-1]


def test_batches_are_sorted_by_length_and_split_across_ranks(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * n} for n in (9, 1, 5, 3)])
    examples = load_jsonl(file, tokenizer)
    batches = list(iterate_batches(examples, 2, shuffle=False, pad_id=tokenizer.pad_id))
    firsts = [int(np.array(w).sum(axis=1).max()) for _, _, w in batches]
    assert firsts == sorted(firsts)
    halves = [list(iterate_batches(examples, 2, shuffle=False, rank=r, world=2)) for r in (0, 1)]
    assert all(b[0].shape[0] == 1 for h in halves for b in h)


def test_long_examples_are_truncated_with_a_warning(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"text": "word " * 50}, {"text": "short"}])
    with pytest.warns(UserWarning, match=r"d.jsonl: 1 example\(s\) longer than max_seq_length=16"):
        examples = load_jsonl(file, tokenizer, max_seq_length=16)
    assert max(len(ids) for ids, _ in examples) == 16


@pytest.mark.parametrize("lines, message", [
    (['{"text": "ok"}', '{"text": "ok"'], r"d.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', '[1, 2]'], r"d.jsonl:2: expected a JSON object"),
    (['{"txt": "ok"}'], r"d.jsonl:1: no 'text'"),
    (['{"prompt": "a"}'], r"d.jsonl:1: 'prompt' and 'completion' must both be strings"),
    (['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'], r"d.jsonl:1: bad messages"),
    ([''], r"d.jsonl: holds no usable example"),
])
def test_bad_data_names_the_file_and_line(lines, message, tokenizer, tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=message):
        load_jsonl(tmp_path / "d.jsonl", tokenizer)


def test_missing_data(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="no such data folder"):
        load_datasets(tmp_path / "nope", tokenizer)
    with pytest.raises(DatasetError, match="fewer than batch_size=8"):
        next(iterate_batches([([2, 3, 4], 0)], 8))


def test_image_examples_need_a_paligemma_and_existing_files(tokenizer, tmp_path):
    file = write_jsonl(tmp_path / "d.jsonl", [{"image": "missing.png", "prefix": "caption en", "suffix": "x"}])
    with pytest.raises(DatasetError, match=r"d.jsonl:1: an 'image' example needs a PaliGemma"):
        load_jsonl(file, tokenizer)
    with pytest.raises(DatasetError, match=r"d.jsonl:1: no such image file"):
        load_jsonl(file, tokenizer, images=(9, 6))


# ----- fuzzing training JSONL -----------------------------------------------------------

from hypothesis import event, example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fuzzing import fuzz_settings, refused_cleanly  # noqa: E402
from test_loading import _json_values, mutated_bytes, mutated_json  # noqa: E402

_RECORDS = [
    {"text": "plain text to learn"},
    {"prompt": "Q: two plus two?", "completion": " Four."},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}, {"role": "model", "content": "Yo"}]},
    {"image": "cat.png", "prefix": "caption en", "suffix": "a cat"},
]
_DATA_KEYS = ["text", "prompt", "completion", "messages", "role", "content", "image", "prefix", "suffix", "type"]
_data_values = _json_values | st.sampled_from(
    ["user", "assistant", "model", "system", "cat.png", "../cat.png", "/dev/null", "x" * 5000, "a\x00b", "\ud800",
     "<end_of_turn>", "", [], [{}], [{"role": "user"}], [{"role": "user", "content": "a"}], {"type": "image"}])
_DATA_FOLDERS: dict = {}


def fuzz_data_folder(tmp_path_factory):
    """A folder holding a tiny image for the JSONL's image examples, made once."""
    if "folder" not in _DATA_FOLDERS:
        from PIL import Image

        folder = tmp_path_factory.mktemp("data")
        Image.new("RGB", (5, 4), (200, 30, 30)).save(folder / "cat.png")
        _DATA_FOLDERS["folder"] = folder
    return _DATA_FOLDERS["folder"]


@st.composite
def mutated_jsonl(draw, images: bool) -> bytes:
    """Some of the example records (image ones only for a PaliGemma), one of them edited as JSON,
    sometimes a stray line, sometimes bytes damaged."""
    records = draw(st.lists(st.sampled_from(_RECORDS if images else _RECORDS[:-1]), min_size=1, max_size=6))
    if draw(st.integers(0, 3)) > 0:
        i = draw(st.integers(0, len(records) - 1))
        records[i] = draw(mutated_json(records[i], _DATA_KEYS, _data_values))
    lines = [json.dumps(r) for r in records]
    if draw(st.integers(0, 3)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(["", "   ", "{", "null", "[]", "\x00"])))
    data = "\n".join(lines).encode("utf-8", "surrogatepass") + draw(st.sampled_from([b"\n", b"", b"\r\n"]))
    return draw(mutated_bytes(data)) if draw(st.integers(0, 4)) == 0 else data


@fuzz_settings(100)
@given(data=st.data(), mask_prompt=st.booleans(), images=st.sampled_from([None, (9, 6)]),
       max_seq_length=st.sampled_from([None, 3, 12, 1000]))
# Deep nesting on one line was a bare RecursionError.
@example(data=b"[" * 100_000 + b"\n", mask_prompt=False, images=None, max_seq_length=None)
# A 5000-digit integer was a bare ValueError from Python's int conversion.
@example(data=b'{"text": 1' + b"0" * 5000 + b"}\n", mask_prompt=False, images=None, max_seq_length=None)
# An image name too long for the file system was a bare OSError (ENAMETOOLONG).
@example(data=json.dumps({"image": "x" * 5000, "prefix": "", "suffix": "a"}).encode(), mask_prompt=False,
         images=(9, 6), max_seq_length=None)
# A lone surrogate (valid JSON, not Unicode) was SentencePiece's bare RuntimeError (at 3ed16a3), then the
# tokenizer's GenerationError naming neither file nor line.
@example(data=b'{"text": "\\ud800"}', mask_prompt=False, images=None, max_seq_length=None)
def test_fuzz_training_jsonl(tokenizer, tmp_path_factory, data, mask_prompt, images, max_seq_length):
    """A JSONL data file with records edited anywhere, lines added or dropped, or bytes damaged:
    every example loaded is real (token ids in the vocabulary, a loss offset inside it) and
    batches, or the refusal is our typed error naming the file (and the line)."""
    folder = fuzz_data_folder(tmp_path_factory)
    path = folder / "train.jsonl"
    path.write_bytes(data if isinstance(data, bytes) else data.draw(mutated_jsonl(images is not None)))
    try:
        examples = load_jsonl(path, tokenizer, mask_prompt=mask_prompt, max_seq_length=max_seq_length,
                              images=images)
    except DatasetError as e:
        assert str(path) in str(e), e
        event("refused")
        return
    event("accepted")
    with refused_cleanly(path, folder / "cat.png"):  # an image path edited to name another file
        for ids, offset, *image in examples:
            assert len(ids) >= 2 and all(isinstance(t, int) and 0 <= t < tokenizer.vocab_size for t in ids)
            assert 0 <= offset < len(ids)
            assert max_seq_length is None or len(ids) <= max_seq_length
        by_kind = [[e for e in examples if len(e) == n] for n in (2, 3)]
        for group in by_kind:
            if group:
                inputs, targets, weights, *rest = make_batch(group, pad_id=tokenizer.pad_id, image_size=14)
                assert inputs.shape == targets.shape == weights.shape and inputs.shape[0] == len(group)


@pytest.mark.parametrize("name, model_type", [("tiny_gemma3_vlm", "gemma3"), ("tiny_shieldgemma2", "shieldgemma2"),
                                              ("tiny_embedding_gemma", "embedding_gemma")])
def test_models_the_tuner_would_treat_as_paligemma_are_refused(tmp_path, capsys, name, model_type):
    """A Gemma 3 VLM has image_input but not PaliGemma's layout: the training CLI refuses it,
    naming the model type, before reading any data (issue 19)."""
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a b c"}])
    model = load(FIXTURES / name)[0]
    with pytest.raises(TrainingError, match=f"model_type '{model_type}'"):
        training_images(model)
    with pytest.raises(TrainingError, match=f"model_type '{model_type}'"):  # the trainer itself, called directly
        trainer.train(model, optim.Adam(1e-3), [([2, 5, 6, 7], 1)], args=trainer.TrainingArgs(iters=1, batch_size=1))
    code = lora_cli.main(["--model", str(FIXTURES / name), "--data", str(tmp_path), "--train", "--iters", "1",
                          "--adapter-path", str(tmp_path / "adapters")])
    err = capsys.readouterr().err
    assert code == 2 and f"model_type '{model_type}'" in err and "\n" not in err.strip()
    assert not (tmp_path / "adapters").exists()


def test_paligemma_and_text_models_keep_their_example_layouts():
    assert training_images(load(FIXTURES / "tiny_gemma")[0]) is None
    model = load(FIXTURES / "tiny_paligemma")[0]
    assert training_images(model) == (model.image_input.num_tokens, model.image_input.token_id)


@pytest.mark.parametrize("empty_thought", [False, True], ids=["e2b-format", "31b-format"])
def test_gemma4_conversations_mask_exactly_the_last_reply(tmp_path, empty_thought):
    """Gemma 4: the loss covers the last model turn (its thought, text and <turn|>) with either
    generation prompt; 26B / 31B's empty thought channel is not in the rendered conversation."""
    from mlx_gemma.tokenizer import GemmaTokenizer

    tok = GemmaTokenizer.from_file(FIXTURES / "gemma4_tokenizer" / "tokenizer.model")
    tok.empty_thought = empty_thought  # as from_folder reads it from a 26B / 31B template
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}]
    reasoned = plain[:2] + [{"role": "assistant", "content": "Hello!", "reasoning": "greet"}]
    twice = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "One."},
             {"role": "assistant", "content": "Two."}]
    file = write_jsonl(tmp_path / "d.jsonl", [{"messages": m} for m in (plain, reasoned, twice)])
    examples = load_jsonl(file, tok, mask_prompt=True)
    learned = [tok.decode(ids[offset:]) for ids, offset in examples]
    assert learned == ["Hello!<turn|>\n", "<|channel>thought\ngreet\n<channel|>Hello!<turn|>\n", "Two.<turn|>\n"]
    for (ids, offset), m in zip(examples, (plain, reasoned, twice)):
        assert ids == tok.apply_chat_template(m, add_generation_prompt=False, tokenize=True)
    head = tok.apply_chat_template(plain[:2], add_generation_prompt=True, tokenize=True, empty_thought=False)
    assert examples[0][1] == len(head)
