"""The fine-tuning loss, data pipeline and loop.

References: transformers' causal-LM loss (labels -100 on prompts and padding)
and torch autograd through PEFT's adapters give the loss and the adapter
gradients for the same weights and batch; the plain full-logits cross-entropy
checks the chunked one (value and gradients).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlx_gemma import lora, train
from mlx_gemma.errors import DatasetError, TrainingError
from mlx_gemma.loading import load, load_model
from mlx_gemma.models import gemma
from mlx_gemma.train_data import iterate_batches, load_datasets, load_jsonl, make_batch

from conftest import FIXTURES, TINY_MODELS
from test_lora import assert_close, load_into_peft, randomize_adapters

PAIRS = [("What is two plus two?", " Four, of course."), ("Name a colour", " Blue"),
         ("Say hello in French, please, and then say goodbye", " Bonjour. Au revoir."), ("Hi", " Hello!")]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load(FIXTURES / "tiny_gemma")[1]


def pair_batch(tokenizer, tmp_path, mask_prompt=True):
    file = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    return make_batch(load_jsonl(file, tokenizer, mask_prompt=mask_prompt), pad_id=tokenizer.pad_id)


# --- loss and gradients against transformers + PEFT ---------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("checkpointed", [False, True])
def test_loss_and_adapter_gradients_match_transformers(name, checkpointed, tokenizer, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    folder = FIXTURES / f"tiny_{name}"
    model = load_model(folder)
    keys = ("q_proj", "v_proj", "down_proj")
    lora.enable_lora(model, rank=4, alpha=8, target_names=keys, num_layers=2)
    randomize_adapters(model)
    inputs, targets, weights = pair_batch(tokenizer, tmp_path)
    if checkpointed:
        train.grad_checkpoint(model)
    loss_and_grad = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=5))
    (loss, ntoks), grads = loss_and_grad(model, inputs, targets, weights)
    grads = dict(tree_flatten(grads))

    n_layers = len(model.layers)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(keys), lora_dropout=0.0,
                             layers_to_transform=list(range(n_layers - 2, n_layers)))
    reference = peft.get_peft_model(reference, config)
    load_into_peft(reference, model)
    tokens = np.concatenate([np.array(inputs), np.array(targets)[:, -1:]], axis=1)
    labels = np.full(tokens.shape, -100)
    labels[:, 1:] = np.where(np.array(weights) > 0, np.array(targets), -100)  # transformers shifts labels itself
    out = reference(input_ids=torch.tensor(tokens), labels=torch.tensor(labels))
    out.loss.backward()

    assert int(ntoks.item()) == int((labels != -100).sum())
    assert abs(loss.item() - out.loss.item()) <= 1e-5 * out.loss.item()
    named = dict(reference.named_parameters())
    for path, _ in lora.lora_layers(model):
        for ours, theirs in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
            expected = named[f"base_model.model.{path}.{theirs}.default.weight"].grad.numpy().T
            assert_close(grads[f"{path}.{ours}"], expected, rtol=1e-4)
    assert len(grads) == 2 * len(lora.lora_layers(model))


# --- the chunked loss --------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 7, 32, 1000])
def test_chunked_loss_equals_full_loss_and_gradients(chunk, tokenizer, tmp_path):
    model = load_model(FIXTURES / "tiny_gemma2")  # with the final logit soft-cap
    lora.enable_lora(model, rank=4, target_names=lora.TARGETS)
    randomize_adapters(model)
    batch = pair_batch(tokenizer, tmp_path)
    (full, n_full), g_full = nn.value_and_grad(model, train.full_cross_entropy)(model, *batch)
    (chunked, n), g = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=chunk))(model, *batch)
    assert n.item() == n_full.item()
    assert abs(chunked.item() - full.item()) <= 1e-6 * full.item()
    g_full = dict(tree_flatten(g_full))
    for k, v in tree_flatten(g):
        assert_close(v, g_full[k], rtol=1e-5)


def small_model(vocab_size: int, **extra) -> gemma.Model:
    config = dict(model_type="gemma", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, **extra)
    return gemma.Model(gemma.ModelArgs.from_dict(config))


def test_chunked_loss_trains_an_untied_head():
    """Gradients reach trainable head weights through the checkpointed chunks."""
    model = small_model(97, tie_word_embeddings=False)
    model.freeze()
    model.lm_head.unfreeze()
    ids = mx.array(np.random.default_rng(0).integers(0, 97, (2, 11)))
    w = mx.ones((2, 10))
    (_, _), g_full = nn.value_and_grad(model, train.full_cross_entropy)(model, ids[:, :-1], ids[:, 1:], w)
    (_, _), g = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=3))(
        model, ids[:, :-1], ids[:, 1:], w)
    assert_close(g["lm_head"]["weight"], g_full["lm_head"]["weight"], rtol=1e-5)


def peak_memory(fn, *args) -> int:
    mx.eval(args)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(fn(*args))
    return mx.get_peak_memory() - base


def test_chunked_loss_peak_memory_is_a_fraction_of_the_full_loss():
    """A tiny-but-wide model (vocab 32k, 2 x 1024 tokens): the [B, T, V] float32 logits dominate the naive loss.

    MLX's CPU backend allocates ahead of the computation until it reaches its
    memory limit, so peaks are measured as a laptop runs: unlimited, and with
    a limit (64 MiB) that makes MLX wait for memory to be freed.
    """
    model = small_model(32768)
    lora.enable_lora(model, rank=4)
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(0).integers(0, 32768, (2, 1025)))
    batch = (ids[:, :-1], ids[:, 1:], mx.ones((2, 1024)))
    full_step = nn.value_and_grad(model, train.full_cross_entropy)
    chunked_step = nn.value_and_grad(model, lambda m, *b: train.loss_fn(m, *b, chunk_size=128))
    logits_bytes = 2 * 1024 * 32768 * 4
    peaks = {}
    limit = mx.get_memory_limit()
    try:
        for label, cap in (("unlimited", limit), ("64 MiB limit", 64 << 20)):
            mx.set_memory_limit(cap)
            peaks[label] = peak_memory(full_step, model, *batch), peak_memory(chunked_step, model, *batch)
    finally:
        mx.set_memory_limit(limit)
    for label, (full, chunked) in peaks.items():
        print(f"{label}: full-logits loss {full / 2**20:.0f} MiB, chunked {chunked / 2**20:.0f} MiB, "
              f"ratio {chunked / full:.2f} (one [2, 1024, 32768] f32 logits: {logits_bytes / 2**20:.0f} MiB)")
        assert full > 2 * logits_bytes  # the naive loss holds the logits and their gradient
    assert peaks["unlimited"][1] < 0.5 * peaks["unlimited"][0]
    assert peaks["64 MiB limit"][1] < logits_bytes / 2


# --- data ----------------------------------------------------------------------------------------


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


def test_bad_settings_are_refused():
    with pytest.raises(TrainingError, match="unknown optimizer 'adagrad'"):
        train.build_optimizer("adagrad", 1e-3)
    with pytest.raises(TrainingError, match="unknown lr schedule"):
        train.build_schedule(1e-3, 10, "linear")
    with pytest.raises(TrainingError, match="warmup"):
        train.build_schedule(1e-3, 10, "cosine", warmup=10)


def test_schedule_warms_up_then_decays():
    schedule = train.build_schedule(1e-3, 100, "cosine", warmup=10)
    lrs = [schedule(mx.array(s)).item() for s in (0, 5, 10, 55, 100)]
    assert lrs[0] == 0 and abs(lrs[1] - 5e-4) < 1e-9 and abs(lrs[2] - 1e-3) < 1e-9
    assert lrs[2] > lrs[3] > lrs[4] and lrs[4] < 1e-8
