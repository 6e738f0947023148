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

import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import FIXTURES

from mlx_gemma.chat import ChatSession, last_reply_as_rendered, next_turn_ids, reply_start_of
from mlx_gemma.errors import GenerationError
from mlx_gemma.generate import stream_generate
from mlx_gemma.loading import load
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


def test_gemma4_images_and_gemma3_thinking_are_typed_errors(model):
    tok = gemma4_tokenizer(False)
    with pytest.raises(GenerationError, match="Gemma 4"):
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
