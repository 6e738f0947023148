"""Fine-tuning data: JSONL formats, prompt masking, batching, truncation, and bad input.

The token ids come from the tokenizer's own calls (encode, apply_chat_template);
each test checks how train_data combines them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_gemma.errors import DatasetError
from mlx_gemma.loading import load
from mlx_gemma.train_data import iterate_batches, load_datasets, load_jsonl, make_batch

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
