"""Chat prompts with tools beside images and audio: `gemma4_prompts.media_rows` and
`image_chat.chat_image_rows` given `tools` / `tool_choice` render the chat as the text path's
`tool_calls.render_chat` does, with each image's and clip's block in place of its placeholder.

References (live, transformers 5.25 on the tiny fixtures' tokenizers):
- Gemma 4: `Gemma4Processor.apply_chat_template(messages, tools=..., tokenize=True)` with Google's
  Gemma 4 chat template (tests/fixtures/gemma4_chat_template, see test_tool_calls.py), images and a
  clip in the messages, on the tiny Gemma 4 fixture with both towers: ids, patches and audio
  features equal ours.
- Gemma 3: its template ignores `tools`; mlx_gemma declares them in Google's prompted format ("Function
  calling with Gemma": the guide's instruction and the functions as JSON in the system prompt, calls as
  JSON lines, results as ```tool_output``` user turns, pinned in test_tool_calls.py).  The conversation
  is written here in that form, by hand, and `Gemma3Processor.apply_chat_template` (Gemma 3's
  published template) renders and expands it: ids and pixels equal ours.
"""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image

import mlx_gemma
from mlx_gemma.errors import GenerationError, ImageError
from mlx_gemma.gemma4_prompts import media_rows
from mlx_gemma.image_chat import chat_image_rows
from mlx_gemma.tool_calls import render_chat

TEMPLATE = (FIXTURES / "gemma4_chat_template" / "chat_template.jinja").read_text(encoding="utf-8")
GEMMA4, VLM3 = FIXTURES / "tiny_gemma4_mm", FIXTURES / "tiny_gemma3_vlm"
# Google's instruction for the JSON variant of its prompted format (the guide's text, line breaks kept).
GUIDE = ("You have access to functions. If you decide to invoke any of the function(s),\n"
         "you MUST put it in the format of\n"
         '{"name": function name, "parameters": dictionary of argument name and its value}\n'
         "You SHOULD NOT include any other text in the response if you call a function")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "A city"}, "days": {"type": "integer"}}}}}
NOW = {"type": "function", "function": {"name": "now", "description": "The time.",
                                        "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, NOW]
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def picture(seed: int, h: int, w: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def as_sent(messages: list) -> list:
    """The messages as an OpenAI client sends them: call arguments as JSON strings."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


def media_of(messages: list, kind: str) -> list:
    """The items the processor reads from the messages' parts (`{"type": kind, kind: item}`), in order."""
    return [p[kind] for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] == kind]


# ----- Gemma 4: Gemma4Processor with Google's template, tools declared -------------------------


@pytest.fixture(scope="module")
def gemma4():
    model, tok = mlx_gemma.load(GEMMA4)
    clip = np.load(GEMMA4 / "reference.npz")["pcm"].astype(np.float32) / 32768.0  # 0.97 s of a tone
    return model, tok, clip


@pytest.fixture(scope="module")
def processor4():
    sys.path.insert(0, str(FIXTURES))
    import make_tiny_gemma4_mm as fixture  # deferred: imports torch and transformers (the live oracle)

    return fixture.processor()


def gemma4_cases(clip) -> dict:
    """name: (messages in the processor's form, tool_choice, the tools the reference declares)."""
    first = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": [{"type": "image", "image": picture(1, 40, 60)},
                                          {"type": "text", "text": "Where is this? And"},
                                          {"type": "audio", "audio": clip}, {"type": "text", "text": "?"}]}]
    result = [{"role": "user", "content": [{"type": "text", "text": "Weather where this is?"},
                                           {"type": "image", "image": picture(2, 70, 30)}]},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny, see"},
                                                                 {"type": "image", "image": picture(3, 45, 45)}]},
              {"role": "assistant", "content": "Sunny."},
              {"role": "user", "content": [{"type": "audio", "audio": -clip[::-1].copy()},
                                           {"type": "text", "text": "And tomorrow?"}]}]
    return {"declared, image and clip": (first, None, TOOLS),
            "required": (first, "required", TOOLS),
            "named function": (first, {"type": "function", "function": {"name": "now"}}, [NOW]),
            "a call, an image in its result": (result, "auto", TOOLS),
            "none, earlier call": (result, "none", None)}


@pytest.mark.oracle
@pytest.mark.parametrize("thinking", [False, True], ids=["thinking-off", "thinking-on"])
def test_gemma4_ids_equal_the_processors(gemma4, processor4, thinking):
    (model, tok, clip), proc = gemma4, processor4
    for name, (messages, choice, declared) in gemma4_cases(clip).items():
        theirs = proc.apply_chat_template(messages, tools=declared, chat_template=TEMPLATE, tokenize=True,
                                          return_dict=True, add_generation_prompt=True, enable_thinking=thinking)
        images, clips = media_of(messages, "image"), media_of(messages, "audio")
        rows, media = media_rows(model, tok, [as_sent(messages)], [images], [clips], chat=True,
                                 enable_thinking=thinking, tools=TOOLS, tool_choice=choice)
        assert rows[0] == np.asarray(theirs["input_ids"])[0].tolist(), name
        assert np.abs(np.array(media.pixel_values) - theirs["pixel_values"]).max() < 1e-6, name
        assert np.array_equal(np.array(media.image_positions), theirs["image_position_ids"]), name
        features = np.asarray(theirs["input_features"])
        assert np.abs(np.array(media.audio_features) - features).max() < 1e-5, name
        # the text path's renderer, media aside: the tools are declared as without media
        text = tok.decode(rows[0])
        assert all(f"declaration:{t['function']['name']}" in text for t in declared or []), name


def test_gemma4_tools_need_a_rendered_chat(gemma4):
    model, tok, clip = gemma4
    with pytest.raises(GenerationError, match="chat template"):
        media_rows(model, tok, ["<|audio|> Hi"], [None], [clip], chat=False, tools=TOOLS)
    ids = media_rows(model, tok, ["<|audio|> Hi"], [None], [clip], chat=True)[0][0]
    with pytest.raises(GenerationError, match="not token ids"):
        media_rows(model, tok, [ids], [None], [clip], tools=TOOLS)
    with pytest.raises(GenerationError, match="not among the tools"):
        media_rows(model, tok, ["<|audio|> Hi"], [None], [clip], chat=True, tools=TOOLS,
                   tool_choice={"type": "function", "function": {"name": "fly"}})


def test_gemma4_without_tools_renders_as_before(gemma4):
    """No tools and no tool_choice: the plain chat template (render_chat is not involved)."""
    model, tok, clip = gemma4
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    plain = media_rows(model, tok, [messages], [None], [clip], chat=True)[0][0]
    with_none = media_rows(model, tok, [messages], [None], [clip], chat=True, tools=[])[0][0]
    declared = media_rows(model, tok, [messages], [None], [clip], chat=True, tools=TOOLS)[0][0]
    assert plain == with_none != declared
    assert len(declared) > len(plain) and tok.decode(declared).count("<|audio|>") == tok.decode(plain).count("<|audio|>")


def test_gemma4_video_beside_tools_gets_the_text_paths_declarations(gemma4):
    """A video (its frames' blocks and times, laid out as without tools) beside tools: the ids are the
    tool-free ids with the text path's declaration turn after <bos>.  (Gemma4Processor's video path
    needs torchvision, which the references do not install: this is our two paths against each other.)"""
    model, tok, _ = gemma4
    frames = np.random.default_rng(7).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When?"}]}]
    plain = media_rows(model, tok, [messages], [None], [None], chat=True, videos=[[frames]])[0][0]
    declared = media_rows(model, tok, [messages], [None], [None], chat=True, videos=[[frames]], tools=TOOLS)[0][0]
    text_only = [{"role": "user", "content": "When?"}]
    turn = render_chat(tok, text_only, TOOLS, tokenize=True)[:-len(tok.apply_chat_template(text_only, tokenize=True)) + 1]
    assert turn[0] == tok.bos_id and tok.decode(turn[1:]).startswith("<|turn>system\n<|tool>declaration:get_weather")
    assert declared == turn + plain[1:]


# ----- Gemma 3: Gemma3Processor with its published template, Google's prompted format ----------


@pytest.fixture(scope="module")
def gemma3():
    return mlx_gemma.load(VLM3)


@pytest.fixture(scope="module")
def processor3():
    sys.path.insert(0, str(FIXTURES))
    from make_tiny_gemma3_vlm import processor  # deferred: imports torch and transformers (the live oracle)
    from test_gemma3_chat import GEMMA3_CHAT_TEMPLATE

    proc = processor(VLM3)
    proc.chat_template = proc.tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    return proc


def functions(tools: list) -> str:
    return json.dumps([t["function"] for t in tools], indent=2)


def gemma3_cases() -> dict:
    """name: (messages, tool_choice, the same conversation in the guide's form, written out)."""
    a, b = picture(4, 40, 60), picture(5, 60, 40)
    ask = {"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Weather there?"}]}
    later = {"role": "user", "content": [{"type": "text", "text": "And here:"}, {"type": "image", "image": b}]}
    conversation = [{"role": "system", "content": "Be brief."}, ask, {"role": "assistant", "content": None,
                                                                      "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21C"},
                    {"role": "assistant", "content": "Sunny."}, later]
    call = json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}})
    guide_turns = [ask, {"role": "assistant", "content": call},
                   {"role": "user", "content": "```tool_output\nsunny, 21C\n```"},
                   {"role": "assistant", "content": "Sunny."}, later]
    return {
        "declared, one image": ([{"role": "system", "content": "Be brief."}, ask], "auto",
                                [{"role": "system", "content": f"Be brief.\n\n{GUIDE}\n{functions(TOOLS)}"}, ask]),
        "a call and its result, two images": (conversation, None, [
            {"role": "system", "content": f"Be brief.\n\n{GUIDE}\n{functions(TOOLS)}"}, *guide_turns]),
        "named function, no system": (conversation[1:], {"type": "function", "function": {"name": "now"}},
                                      [{"role": "system", "content": f"{GUIDE}\n{functions([NOW])}"}, *guide_turns]),
        "none, earlier call": (conversation, "none", [{"role": "system", "content": "Be brief."}, *guide_turns]),
    }


@pytest.mark.oracle
def test_gemma3_ids_equal_the_processors_on_the_guides_conversation(gemma3, processor3):
    (model, tok), proc = gemma3, processor3
    for name, (messages, choice, guide) in gemma3_cases().items():
        theirs = proc.apply_chat_template(guide, tokenize=True, return_dict=True, add_generation_prompt=True)
        rows, pixels = chat_image_rows(model, tok, [as_sent(messages)], [media_of(messages, "image")], chat=True,
                                       system=None, tools=TOOLS, tool_choice=choice)
        assert rows[0] == np.asarray(theirs["input_ids"])[0].tolist(), name
        reference = np.asarray(theirs["pixel_values"]).transpose(0, 2, 3, 1)  # NCHW -> ours, NHWC
        assert np.abs(np.array(pixels) - reference).max() < 1e-6, name
    # the template itself knows no tools: passing them changes nothing (hence the prompted format)
    plain = gemma3_cases()["declared, one image"][0]
    assert proc.apply_chat_template(plain, tools=TOOLS, tokenize=False) == proc.apply_chat_template(plain, tokenize=False)


def test_gemma3_matches_render_chat_text_path(gemma3):
    """The media builder and the text path render the same conversation alike: the ids differ only
    where each image's block stands in for its `<start_of_image>`."""
    model, tok = gemma3
    messages, choice, _ = gemma3_cases()["a call and its result, two images"]
    rows, _ = chat_image_rows(model, tok, [as_sent(messages)], [media_of(messages, "image")], chat=True, system=None,
                              tools=TOOLS, tool_choice=choice)
    spec = model.image_input
    text = render_chat(tok, as_sent(messages), TOOLS, choice)
    block = tok.id_to_piece(spec.start_id)
    expanded = text.replace(block, "\n\n" + block + tok.id_to_piece(spec.token_id) * spec.num_tokens
                            + tok.id_to_piece(spec.end_id) + "\n\n")
    assert tok.decode(rows[0]) == expanded.removeprefix(tok.id_to_piece(tok.bos_id))


def test_gemma3_images_outside_user_turns_are_refused_with_tools(gemma3):
    """Google's prompted format writes tool results as text: an image there would leave the prompt
    while its pixels stayed, so it is a typed error, not a silent drop."""
    model, tok = gemma3
    messages = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "see"},
                                                                   {"type": "image"}]}]
    with pytest.raises(ImageError, match="only those of user messages"):
        chat_image_rows(model, tok, [as_sent(messages)], [[picture(6, 30, 30)]], chat=True, system=None, tools=TOOLS)
    with pytest.raises(GenerationError, match="chat template"):
        chat_image_rows(model, tok, ["<start_of_image> hi"], [[picture(6, 30, 30)]], chat=False, system=None,
                        tools=TOOLS)
