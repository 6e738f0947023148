"""Chat with images on Gemma 3: the chat template's image parts, ChatSession's prompt cache
(the vision tower sees each image once; a different image is never taken from the cache), and
the CLIs, against transformers 5.25 (Gemma3Processor with Gemma 3's published chat template,
Gemma3ForConditionalGeneration's greedy generate) on the tiny fixture of test_gemma3_vlm.
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

import mlx_gemma
from mlx_gemma import chat as chat_cli
from mlx_gemma.chat import ChatSession, next_turn_ids
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import main, stream_generate
from mlx_gemma.prompt_cache import PromptCache, save_prompt_cache

FOLDER = FIXTURES / "tiny_gemma3_vlm"
MAX_TOKENS = 8

# google/gemma-3-4b-it's chat_template (tokenizer_config.json / chat_template.json), verbatim.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = mlx_gemma.load(FOLDER)
    return model, tokenizer, dict(np.load(FOLDER / "reference.npz"))


class TowerCount:
    """Counts the images that go through the vision tower (and projector)."""

    def __init__(self, model, monkeypatch):
        self.images, inner = 0, model.model.image_features

        def counted(pixel_values):
            self.images += pixel_values.shape[0]
            return inner(pixel_values)

        monkeypatch.setattr(model.model, "image_features", counted)


def tokens(responses) -> list[int]:
    return [r.token for r in responses]


# ----- live oracle: transformers on the whole conversation -----------------------------------


def _greedy(torch, model, inputs, eot) -> list[int]:
    """transformers' greedy tokens, up to and with the first stop id."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=[1, eot],
                             pad_token_id=0)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new[: next((i + 1 for i, t in enumerate(new) if t in (1, eot)), len(new))]


@pytest.mark.oracle
def test_two_turn_chat_equals_transformers_on_the_whole_conversation(loaded, monkeypatch):
    """Turn 1 with an image, turn 2 a question: each turn's greedy tokens are transformers' for the
    whole conversation so far, rendered by Gemma 3's template and encoded by its processor; the
    vision tower runs once.  The tiny random model's reply is no text that re-encodes to itself,
    so in turn 2 the reply goes in as the ids it was (the rest of the conversation as rendered)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    sys.path.insert(0, str(FIXTURES))
    from make_tiny_gemma3_vlm import processor

    model, tok, ref = loaded
    proc = processor(FOLDER)
    proc.chat_template = proc.tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    reference = transformers.Gemma3ForConditionalGeneration.from_pretrained(FOLDER, attn_implementation="eager").eval()
    image = Image.fromarray(ref["image0"])
    eot = tok.end_of_turn_id

    towers = TowerCount(model, monkeypatch)
    session = ChatSession(model, tok, system="Answer briefly.", max_tokens=MAX_TOKENS)
    first = tokens(session.send("What is in this image?", [image]))
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    text1 = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = proc(text=[text1], images=[[image]], return_tensors="pt", add_special_tokens=False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values")}
    turn1 = inputs["input_ids"][0].tolist()
    assert session.history[: len(turn1)] == turn1
    assert first == _greedy(torch, reference, inputs, eot)

    reply = tok.decode([t for t in first if t != eot])
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "And what colour is it?"}]
    text2 = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    rest = text2[len(text1) + len(reply):]
    assert text2[: len(text1) + len(reply)] == text1 + reply
    ids = turn1 + [t for t in first if t != eot] + proc.tokenizer(rest, add_special_tokens=False)["input_ids"]
    second = tokens(session.send("And what colour is it?"))
    assert session.history[: len(ids)] == ids
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "token_type_ids": (input_ids == 401).long(), "pixel_values": batch["pixel_values"]}
    assert second == _greedy(torch, reference, inputs, eot)
    assert towers.images == 1


# ----- the prompt cache and images -------------------------------------------------------------


def test_a_different_image_is_not_taken_from_the_cache(loaded, monkeypatch):
    """A conversation continued with the same ids but another image in turn 1: the cached image is
    not reused (the result is a fresh run's, the new image goes through the tower); continued
    with the same image: only the new turn is fed and the tower does not run."""
    model, tok, ref = loaded
    towers = TowerCount(model, monkeypatch)
    block = mlx_gemma.image_chat.image_block(model.image_input)
    content = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    turn1 = next_turn_ids(tok, [], content, image_block=block)
    for image, reused in ((ref["image1"], False), (ref["image0"], True)):
        cache = PromptCache(model)
        reply = tokens(stream_generate(model, tok, turn1, image=[ref["image0"]], prompt_cache=cache, max_tokens=4))
        held, before = cache.offset, towers.images
        ids = next_turn_ids(tok, turn1 + reply, "Why?", image_block=block)
        assert cache.tokens == ids[:held]  # the token ids alone would all be reused
        cached = list(stream_generate(model, tok, ids, image=[image], prompt_cache=cache, max_tokens=4))
        fresh = tokens(stream_generate(model, tok, ids, image=[image], max_tokens=4))
        assert tokens(cached) == fresh
        assert towers.images - before == (1 if reused else 2)  # (+1: the fresh run)
        assert (cached[0].prompt_tokens == len(ids) - held) == reused


def test_image_turn_then_text_turns_keep_the_cache(loaded, monkeypatch):
    """Three turns, an image in turns 1 and 3: every turn equals a fresh run of the whole
    conversation, and each image goes through the tower once."""
    model, tok, ref = loaded
    towers = TowerCount(model, monkeypatch)
    session = ChatSession(model, tok, max_tokens=5)
    images, in_session = [], 0
    for text, image in (("What is this?", ref["image0"]), ("Why?", None), ("<start_of_image> and this?", ref["image2"])):
        images += [] if image is None else [image]
        before = towers.images
        got = tokens(session.send(text, None if image is None else [image]))
        in_session += towers.images - before
        prompt = session.history[: len(session.history) - len(got)]
        fresh = tokens(stream_generate(model, tok, prompt, image=list(images), max_tokens=5,
                                       stop_token_ids=[tok.end_of_turn_id]))
        assert got == fresh
    assert in_session == 2


def test_bad_image_chats(loaded):
    model, tok, ref = loaded
    text_model, text_tok = mlx_gemma.load(FIXTURES / "tiny_gemma3")
    with pytest.raises(GenerationError, match="takes no images"):
        ChatSession(text_model, text_tok).reply("Hi", [ref["image0"]])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    with pytest.raises(mlx_gemma.errors.ImageError, match="1 image parts for 2 image"):
        mlx_gemma.generate(model, tok, messages, image=[ref["image0"], ref["image1"]], max_tokens=1)
    cache = PromptCache(model)
    mlx_gemma.generate(model, tok, messages, image=[ref["image0"]], prompt_cache=cache, max_tokens=1)
    with pytest.raises(GenerationError, match="holding images cannot be saved"):
        save_prompt_cache("/nonexistent/x.safetensors", cache)


# ----- command lines ---------------------------------------------------------------------------


def test_generate_cli_chat_with_images(loaded, tmp_path, capsys):
    model, tok, ref = loaded
    paths = []
    for i in (1, 2):
        paths.append(tmp_path / f"image{i}.png")
        Image.fromarray(ref[f"image{i}"]).save(paths[-1])  # lossless
    prompt = "Compare <start_of_image> with <start_of_image>."
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                             {"type": "text", "text": " with "}, {"type": "image"},
                                             {"type": "text", "text": "."}]}]
    expected = mlx_gemma.generate(model, tok, messages, image=[ref["image1"], ref["image2"]], max_tokens=6)
    argv = ["--model", str(FOLDER), "-p", prompt, "--max-tokens", "6", "--chat", "--system", "Be brief."]
    assert main(argv + ["--image", str(paths[0]), "--image", str(paths[1])]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_chat_cli_image_command(loaded, tmp_path, monkeypatch, capsys):
    model, tok, ref = loaded
    path = tmp_path / "image.png"
    Image.fromarray(ref["image0"]).save(path)
    session = ChatSession(model, tok, max_tokens=4)
    first = session.reply("What is it?", [ref["image0"]])
    second = session.reply("Why?")
    stdin = f"/image {tmp_path / 'missing.png'}\n/image {path}\nWhat is it?\nWhy?\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    assert chat_cli.main(["--model", str(FOLDER), "--max-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out == first + "\n" + second + "\n"
    assert "not attached" in captured.err and "attached to your next message" in captured.err
    assert "/image PATH" in chat_cli.build_parser().format_help()
