"""A Gemma 4 conversation in `ChatSession` (mlx_gemma/chat.py): thinking on and off, both
generation prompts (E2B / E4B, and 26B / 31B's empty thought channel), earlier thoughts dropped.

References: each turn's ids must equal `apply_chat_template` of the whole conversation rendered
fresh (our rendering of Google's Gemma 4 template, checked against transformers' in
test_gemma4_chat.py; it drops an earlier reply's thoughts), and each turn's greedy tokens must
equal a fresh, uncached `stream_generate` of those ids.  The model is the tiny E2B-like fixture
(KV sharing, per-layer inputs; 512 rows) under the tiny Gemma 4 tokenizer (420 pieces).
Replies whose ids the test must know are scripted by a logits processor that forces tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from conftest import FIXTURES

from mlx_gemma.chat import ChatSession, last_reply_as_rendered, next_turn_ids, reply_start_of
from mlx_gemma.errors import AudioError, GenerationError, ImageError
from mlx_gemma.generate import stream_generate
from mlx_gemma.loading import load
from mlx_gemma.models import gemma4_mm
from mlx_gemma.tokenizer import GemmaTokenizer

MODEL = FIXTURES / "tiny_gemma4_e2b"
TOKENIZER = FIXTURES / "gemma4_tokenizer" / "tokenizer.model"
SYSTEM = "Be brief."


class Script:
    """A logits processor that forces the ids in `queue`, one per step, then lets the model choose."""

    def __init__(self):
        self.queue: list[int] = []

    def __call__(self, tokens, logits):
        if not self.queue:
            return logits
        forced = self.queue.pop(0)
        return mx.where(mx.arange(logits.shape[-1]) == forced, mx.zeros_like(logits), -mx.inf)  # [B, vocab]


@pytest.fixture(scope="module")
def model():
    return load(MODEL)[0]


def gemma4_tokenizer(empty_thought: bool) -> GemmaTokenizer:
    tok = GemmaTokenizer.from_file(TOKENIZER)
    tok.empty_thought = empty_thought  # 26B / 31B's generation prompt (from_folder reads it from the template)
    return tok


def thought(tok, text: str) -> list[int]:
    return [tok.piece_to_id("<|channel>"), *tok.encode("thought\n" + text, add_bos=False), tok.piece_to_id("<channel|>")]


def fresh(model, tok, ids, max_tokens):
    return [r.token for r in stream_generate(model, tok, ids, max_tokens=max_tokens)]


@pytest.mark.parametrize("empty_thought", [False, True], ids=["e2b-format", "31b-format"])
@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
def test_two_turns_are_the_template_rendered_fresh_and_a_fresh_run(model, thinking, empty_thought):
    tok, script = gemma4_tokenizer(empty_thought), Script()
    chat = ChatSession(model, tok, system=SYSTEM, max_tokens=24, enable_thinking=thinking, logits_processors=[script])
    eot = tok.end_of_turn_id
    # The first reply: a thought when thinking is on, then "Hello!" and <turn|>.
    said = (thought(tok, "plan it") if thinking else []) + tok.encode("Hello!", add_bos=False) + [eot]
    script.queue = list(said)
    first = [r.token for r in chat.send("Hi there")]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi there"}]
    turn1 = tok.apply_chat_template(messages, tokenize=True, enable_thinking=thinking)
    assert first == said and chat.history == turn1 + said  # the stop id comes last, kept in the history
    assert (turn1[-1] == tok.piece_to_id("<channel|>")) == (empty_thought and not thinking)

    # The second turn, generated freely: its ids drop the thought (and the empty one), as the template does.
    second = [r.token for r in chat.send("How are you?")]
    reply = ("<|channel>thought\nplan it<channel|>" if thinking else "") + "Hello!"
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "How are you?"}]
    turn2 = tok.apply_chat_template(messages, tokenize=True, enable_thinking=thinking)
    assert chat.history == turn2 + second
    assert second == fresh(model, tok, turn2, 24)
    assert chat.cache.tokens == chat.history[:chat.cache.offset]  # the cache holds what the history says


def test_a_free_reply_with_a_thought_then_a_fresh_run(model):
    """The first reply opens with a forced thought, then runs greedily; the next turn has the reply
    without the thought and gives the tokens a fresh run gives."""
    tok, script = gemma4_tokenizer(False), Script()
    chat = ChatSession(model, tok, max_tokens=30, enable_thinking=True, logits_processors=[script])
    prefix = thought(tok, "go")
    script.queue = list(prefix)
    first = [r.token for r in chat.send("Tell me a story")]
    turn1 = next_turn_ids(tok, [], "Tell me a story", enable_thinking=True)
    assert first[:len(prefix)] == prefix and len(first) > len(prefix)
    assert first[len(prefix):] == fresh(model, tok, turn1 + prefix, 30 - len(prefix))  # greedy after the thought
    second = [r.token for r in chat.send("And then?")]
    turn2 = next_turn_ids(tok, turn1 + first, "And then?", enable_thinking=True)
    assert tok.piece_to_id("<|channel>") not in turn2 and turn2[:len(turn1)] == turn1
    assert chat.history == turn2 + second and second == fresh(model, tok, turn2, 30)


def test_a_reply_cut_inside_its_thought_renders_empty(model):
    tok, script = gemma4_tokenizer(False), Script()
    chat = ChatSession(model, tok, max_tokens=4, enable_thinking=True, logits_processors=[script])
    script.queue = thought(tok, "a long plan that runs on")[:-1]  # never closed
    cut = [r.token for r in chat.send("Hi")]
    assert len(cut) == 4
    script.queue = []  # the second reply is the model's own
    second = [r.token for r in chat.send("Go on")]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": tok.decode(cut)},
                {"role": "user", "content": "Go on"}]
    turn2 = tok.apply_chat_template(messages, tokenize=True, enable_thinking=True)
    assert chat.history[:len(turn2)] == turn2 and second == fresh(model, tok, turn2, 4)


def test_reply_ends_trimmed_and_stray_channel_marks_dropped_as_the_template_does():
    tok = gemma4_tokenizer(False)
    turn1 = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    start, eot = reply_start_of(tok, turn1), tok.end_of_turn_id
    assert start == len(turn1)
    for text in ("\n\nHello!  \n", "Hel<channel|>lo!", "<|channel>thought\nx<channel|>\n Hello!"):
        rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": text}],
                                           add_generation_prompt=False, tokenize=True)
        ids = turn1 + _with_marks(tok, text) + [eot]
        assert last_reply_as_rendered(tok, ids) + [tok.encode("\n", add_bos=False)[0]] == rendered


def _with_marks(tok, text: str) -> list[int]:
    """`text` as the model would emit it: the thought marks as their ids, the rest as plain text."""
    out: list[int] = []
    for i, part in enumerate(text.split("<channel|>")):
        if i:
            out.append(tok.piece_to_id("<channel|>"))
        head, *rest = part.split("<|channel>")
        out += tok.encode(head, add_bos=False) if head else []
        for r in rest:
            out += [tok.piece_to_id("<|channel>")] + (tok.encode(r, add_bos=False) if r else [])
    return out


def test_images_on_a_text_model_and_gemma3_thinking_are_typed_errors(model):
    tok = gemma4_tokenizer(False)
    with pytest.raises(ImageError, match="no vision tower"):  # before the file is even looked for
        list(ChatSession(model, tok).send("What is this?", images=[FIXTURES / "nope.png"]))
    gemma3_model, gemma3_tok = load(FIXTURES / "tiny_gemma3")
    with pytest.raises(GenerationError, match="enable_thinking"):
        ChatSession(gemma3_model, gemma3_tok, enable_thinking=True)
    with pytest.raises(GenerationError, match="enable_thinking"):
        next_turn_ids(gemma3_tok, [], "Hi", enable_thinking=True)


def test_cli_enable_thinking_equals_the_session(model, tmp_path):
    folder = tmp_path / "tiny_gemma4_chat"
    shutil.copytree(MODEL, folder)
    shutil.copyfile(TOKENIZER, folder / "tokenizer.model")  # the Gemma 4 vocabulary (420 of 512 rows)
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.chat", "--model", str(folder), "--max-tokens", "5",
                           "--enable-thinking"], input="Hello\nTell me more\n", capture_output=True, text=True,
                          timeout=120, cwd=FIXTURES.parents[1])
    assert done.returncode == 0, done.stderr
    m, tok = load(folder)
    chat = ChatSession(m, tok, max_tokens=5, enable_thinking=True)
    assert done.stdout == "".join(chat.reply(t) + "\n" for t in ("Hello", "Tell me more"))


def test_a_reply_the_template_keeps_as_is_is_not_prefilled_again(model):
    """Thinking off, E2B's prompt, a reply without thoughts or edge whitespace: nothing in the history
    changes, so the next turn prefills only its own tokens (even past the sliding window)."""
    from test_prompt_cache import Counting

    tok, script, counting = gemma4_tokenizer(False), Script(), Counting(model)
    chat = ChatSession(counting, tok, max_tokens=8, logits_processors=[script])
    script.queue = tok.encode("Hello!", add_bos=False) + [tok.end_of_turn_id]
    list(chat.send("Hi there"))
    before, cached, counting.fed = list(chat.history), chat.cache.offset, 0
    assert cached > model.args.sliding_window  # the window has wrapped: going back would mean starting over
    second = [r.token for r in chat.send("How are you?")]
    full = next_turn_ids(tok, before, "How are you?")
    assert full[:len(before)] == before and chat.history == full + second
    # The new turn, then the decode steps (the last one fed or not): never the conversation again.
    assert len(full) - cached <= counting.fed <= len(full) - cached + len(second) < len(full)


# ----- images and audio (the tiny model with both towers) -------------------------------------

MM = FIXTURES / "tiny_gemma4_mm"


@pytest.fixture(scope="module")
def mm():
    return load(MM)


def picture(seed: int, h: int, w: int):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return np.load(MM / "reference.npz")["pcm"].astype(np.float32) / 32768.0  # 0.97 s of a tone at 16 kHz


def media_parts(text: str, images: list, clips: list) -> list[dict]:
    """A user turn as the processor takes it: `text` cut at its markers, each marker the next image or
    clip (itself in the part); without markers, the images, then the clips, then the text."""
    if "<|image|>" not in text and "<|audio|>" not in text:
        text = "<|image|>" * len(images) + "<|audio|>" * len(clips) + text
    images, clips, parts = iter(images), iter(clips), []
    for piece in re.split(r"(<\|image\|>|<\|audio\|>)", text):
        if piece == "<|image|>":
            parts.append({"type": "image", "image": next(images)})
        elif piece == "<|audio|>":
            parts.append({"type": "audio", "audio": next(clips)})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


@pytest.mark.oracle
@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
def test_media_turns_are_the_processors_chat_template_and_a_fresh_run(mm, clip, thinking):
    """Three turns: an image and a clip at their markers, two images without markers, a clip.  Each
    turn's ids equal transformers' Gemma4Processor.apply_chat_template of the whole conversation
    (our Gemma 4 template rules, test_gemma4_chat.py; the processor expands and tokenizes), the last
    reply equals a fresh uncached run, and without thoughts each turn feeds only its own tokens."""
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_gemma4_mm as fixture  # deferred: imports torch and transformers (the live oracle)
    from test_gemma4_chat import GEMMA4_RULES

    model, tok = mm
    proc, script = fixture.processor(), Script()
    chat = ChatSession(model, tok, system=SYSTEM, max_tokens=24, enable_thinking=thinking, logits_processors=[script])
    turns = [("What is <|image|> saying <|audio|>?", [picture(1, 40, 60)], [clip]),
             ("And these two?", [picture(2, 70, 30), picture(3, 45, 45)], []),
             ("Now listen.", [], [-clip[::-1].copy()])]
    said = [(thought(tok, "look") if thinking else []) + tok.encode("A cat.", add_bos=False) + [tok.end_of_turn_id],
            tok.encode("Two dogs.", add_bos=False) + [tok.end_of_turn_id], None]  # the last reply: the model's
    texts = [("<|channel>thought\nlook<channel|>" if thinking else "") + "A cat.", "Two dogs."]
    messages, images, clips = [{"role": "system", "content": SYSTEM}], [], []
    for (text, new_images, new_clips), forced, said_text in zip(turns, said, texts + [None]):
        before = list(chat.history)
        script.queue = list(forced or [])
        reply = list(chat.send(text, images=new_images, audio=new_clips))
        messages.append({"role": "user", "content": media_parts(text, new_images, new_clips)})
        images, clips = images + new_images, clips + new_clips
        theirs = proc.apply_chat_template(messages, chat_template=GEMMA4_RULES, tokenize=True, return_dict=True,
                                          add_generation_prompt=True, enable_thinking=thinking, empty_thought=False)
        ids = np.asarray(theirs["input_ids"])[0].tolist()
        assert chat.history == ids + [r.token for r in reply]
        if forced is None:
            assert [r.token for r in reply] == fresh_media(model, tok, ids, images, clips, 24)
        else:
            assert [r.token for r in reply] == forced
            messages.append({"role": "assistant", "content": said_text})
        if before and not thinking:  # the cached conversation, its media included, is not fed again
            assert reply[0].prompt_tokens <= len(ids) - len(before) + 1
    assert [d.split(":")[0] for _, _, d in chat.cache.images] == ["image", "audio", "image", "image", "audio"]


def fresh_media(model, tok, ids, images, clips, max_tokens) -> list[int]:
    return [r.token for r in stream_generate(model, tok, ids, image=images or None, audio=clips or None,
                                             max_tokens=max_tokens)]


def test_free_media_replies_equal_fresh_runs(mm, clip):
    """Every reply the model's own (greedy), media in the first two turns: each equals a fresh run
    of the whole conversation's ids with every image and clip so far."""
    model, tok = mm
    chat = ChatSession(model, tok, max_tokens=5)
    images, clips = [], []
    for text, new_images, new_clips in (("Describe it.", [picture(4, 50, 70)], [clip]),
                                        ("<|image|> or <|image|>?", [picture(5, 30, 90), picture(6, 90, 30)], []),
                                        ("Which one?", [], [])):
        reply = [r.token for r in chat.send(text, new_images, new_clips)]
        images, clips = images + new_images, clips + new_clips
        ids = chat.history[:len(chat.history) - len(reply)]
        assert reply == fresh_media(model, tok, ids, images, clips, 5)
    image, audio = (tok.piece_to_id(p) for p in ("<|image>", "<|audio>"))
    assert chat.history.count(image) == 3 and chat.history.count(audio) == 1
    assert len(chat.images) == 3 and len(chat.clips) == 1
    chat.reset()
    assert chat.history == [] and chat.images == [] and chat.clips == [] and chat.cache.tokens == []


def test_media_the_model_cannot_take_are_typed_errors_and_change_nothing(mm, model, clip):
    """A clip on a model without an audio tower, an image on a text model, a marker count that differs
    from the media, audio on Gemma 3: typed errors; the session goes on as if they were never sent."""
    mm_model, tok = mm
    config = json.loads((MM / "config.json").read_text())
    vision_only = gemma4_mm.Model(gemma4_mm.ModelArgs.from_dict({**config, "audio_config": None}))  # random weights
    image = picture(7, 20, 20)
    cases = [(ChatSession(vision_only, tok, max_tokens=3), "Hear it", dict(audio=[clip]), AudioError, "no audio tower"),
             (ChatSession(model, gemma4_tokenizer(False), max_tokens=3), "See it", dict(images=[image]), ImageError,
              "no vision tower"),
             (ChatSession(mm_model, tok, max_tokens=3), "Look at <|image|>", dict(images=[image, image]), ImageError,
              "1 <\\|image\\|> markers for 2"),
             (ChatSession(mm_model, tok, max_tokens=3), "<|image|>, <|audio|> and <|audio|>",
              dict(images=[image], audio=[clip]), AudioError, "2 <\\|audio\\|> markers for 1")]
    for chat, text, media, error, match in cases:
        first = chat.reply("Hi <|image|>")  # plain text without media: the marker is only text
        state = (list(chat.history), list(chat.cache.tokens), list(chat.images), list(chat.clips), chat.reply_start)
        with pytest.raises(error, match=match):
            list(chat.send(text, **media))
        assert (chat.history, chat.cache.tokens, chat.images, chat.clips, chat.reply_start) == state
        again = [r.token for r in chat.send("More?")]
        redo = ChatSession(chat.model, chat.tokenizer, max_tokens=3)
        assert redo.reply("Hi <|image|>") == first and [r.token for r in redo.send("More?")] == again
    gemma3_model, gemma3_tok = load(FIXTURES / "tiny_gemma3")
    with pytest.raises(AudioError, match="takes no audio"):
        list(ChatSession(gemma3_model, gemma3_tok).send("Hi", audio=[clip]))
    with pytest.raises(GenerationError, match="pan & scan is Gemma 3's"):
        ChatSession(mm_model, tok, pan_and_scan=True)


def test_unreadable_media_are_typed_errors_and_change_nothing(mm, clip, tmp_path):
    model, tok = mm
    chat = ChatSession(model, tok, max_tokens=3)
    first = [r.token for r in chat.send("What is <|image|>?", images=[picture(9, 30, 30)])]
    state = (list(chat.history), list(chat.cache.tokens), list(chat.images), list(chat.clips))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not a wave")
    for media, error in ((dict(images=[tmp_path / "bad.png"]), ImageError),
                         (dict(audio=[tmp_path / "bad.wav"]), AudioError),
                         (dict(audio=[np.full(16_000 * 31, 0.1, np.float32)]), AudioError)):  # over 30 s
        with pytest.raises(error):
            list(chat.send("And this?", **media))
        assert (chat.history, chat.cache.tokens, chat.images, chat.clips) == state
    redo = ChatSession(model, tok, max_tokens=3)  # the same conversation without the failed turns
    assert [r.token for r in redo.send("What is <|image|>?", images=[picture(9, 30, 30)])] == first
    assert chat.reply("Go on.") == redo.reply("Go on.")


def test_cli_attaches_images_and_clips(mm, clip, tmp_path):
    """`/image PATH` and `/audio PATH` attach to the next message: the replies are the session's."""
    import soundfile

    png, wav = tmp_path / "look.png", tmp_path / "tone.wav"
    picture(8, 40, 60).save(png)
    soundfile.write(wav, np.load(MM / "reference.npz")["pcm"], 16_000, subtype="PCM_16")
    lines = f"/image {png}\n/audio {wav}\nWhat is it?\n/image {tmp_path / 'missing.png'}\nAnd now?\n"
    done = subprocess.run([sys.executable, "-m", "mlx_gemma.chat", "--model", str(MM), "--max-tokens", "4"],
                          input=lines, capture_output=True, text=True, timeout=180, cwd=FIXTURES.parents[1])
    assert done.returncode == 0, done.stderr
    assert "attached" in done.stderr and "not attached" in done.stderr
    model, tok = mm
    chat = ChatSession(model, tok, max_tokens=4)
    want = chat.reply("What is it?", images=[png], audio=[clip]) + "\n" + chat.reply("And now?") + "\n"
    assert done.stdout == want
